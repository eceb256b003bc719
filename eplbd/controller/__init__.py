"""eplbd.controller."""
