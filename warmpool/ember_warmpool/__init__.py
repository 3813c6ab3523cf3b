"""Warm pools of function workers (lands with the warm-pool issue)."""
