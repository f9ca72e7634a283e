"""Dramatiq actors, model and container runners, result encoders."""

__all__: list[str] = []
