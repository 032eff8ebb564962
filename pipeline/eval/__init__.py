"""Evaluation: VQA metric, datasets, contamination checks."""
