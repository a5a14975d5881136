"""Tracking: the MLflow (default) or W&B record of runs, and the versioned datasets, models and evaluations."""
