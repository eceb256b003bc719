"""eplbd.planner."""
