"""Datasets and the resumable sampler."""
