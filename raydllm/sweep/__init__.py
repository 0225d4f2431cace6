"""Sweep layer: one run's Ray Train driver, the search space, Ray Tune sweeps, results, reports and MLflow."""
