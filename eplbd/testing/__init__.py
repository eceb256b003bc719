"""eplbd.testing."""
