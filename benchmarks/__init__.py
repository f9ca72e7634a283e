"""Reproducible performance measurements against reference tools, run side by side."""
