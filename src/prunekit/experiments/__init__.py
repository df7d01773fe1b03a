"""Experiments over pruning runs: evaluation summaries and calibration sweeps."""
