"""Datasets, splits, samplers and transforms."""
