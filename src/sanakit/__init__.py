"""sanakit: train, resume, sample and export Sana-style text-to-image models."""

__version__ = "0.1.0"
