"""eplbd.wire."""
