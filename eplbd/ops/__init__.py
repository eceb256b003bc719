"""eplbd.ops."""
