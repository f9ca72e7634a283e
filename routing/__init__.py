"""Rules: matching studies and series, explaining decisions, turning studies into jobs."""

__all__: list[str] = []
