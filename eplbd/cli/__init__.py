"""eplbd.cli."""
