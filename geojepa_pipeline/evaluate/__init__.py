"""Evaluation: task labels and their removal from the input, probes, baselines, kNN metrics, reports."""
