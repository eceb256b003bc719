"""eplbd.agent."""
