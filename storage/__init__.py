"""Index (SQLAlchemy models, migrations) and the durable file store."""

from storage.db import make_engine, upgrade_schema, utcnow
from storage.filestore import FileStore, sanitize_uid
from storage.models import (
    Base,
    CompletionEvent,
    Instance,
    QuarantineRecord,
    Series,
    Study,
    StudyState,
)

__all__ = [
    "Base",
    "CompletionEvent",
    "FileStore",
    "Instance",
    "QuarantineRecord",
    "Series",
    "Study",
    "StudyState",
    "make_engine",
    "sanitize_uid",
    "upgrade_schema",
    "utcnow",
]
