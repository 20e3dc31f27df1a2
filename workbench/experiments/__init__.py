"""Experiments: workloads and the strategy comparison harness."""
