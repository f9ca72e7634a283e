"""The error tree of dicomnode: one root, a subtree per area."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DicomNodeError",
    "IndexMissingError",
    "IngestError",
    "QuarantinedError",
    "StorageError",
]


class DicomNodeError(Exception):
    """Root of every error dicomnode raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` holds one line per problem, each naming file, line, field and a fix.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return super().__str__()
        return "\n".join([super().__str__(), *("  " + p for p in self.problems)])


class StorageError(DicomNodeError):
    """The file store or the index could not keep an instance (disk, database)."""


class IndexMissingError(StorageError):
    """There is no dicomnode index where the configuration points (a command that only reads
    the index never creates one)."""


class IngestError(DicomNodeError):
    """An instance could not be accepted."""


class QuarantinedError(IngestError):
    """The input was unreadable or rejected and has been moved to quarantine.

    ``reason`` says why; ``path`` is where the quarantined copy lies; ``kind`` is what was
    wrong with it: ``unreadable`` (it cannot be parsed or indexed), ``mismatch`` (it is not
    what the C-STORE request said it is), ``conflict`` (its SOP Instance UID is stored with
    other content) or ``other_patient`` (it belongs to a study of another patient).
    """

    def __init__(self, reason: str, path: str, kind: str = "unreadable") -> None:
        super().__init__(f"quarantined: {reason} ({path})")
        self.reason = reason
        self.path = path
        self.kind = kind
