"""Engine and schema set-up for the index (SQLite in WAL mode, or PostgreSQL)."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.pool import NullPool

__all__ = [
    "alembic_config",
    "index_location",
    "make_engine",
    "missing_index",
    "sqlite_pragmas",
    "upgrade_schema",
    "utcnow",
]

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Tables every index has from its first migration on (and Alembic's revision table).
_INDEX_TABLES = frozenset({"alembic_version", "studies"})


def utcnow() -> datetime:
    """Naive UTC now, the time format of every column in the index."""
    return datetime.now(UTC).replace(tzinfo=None)


def sqlite_pragmas(dbapi_conn: Any, _record: Any = None) -> None:
    """The settings of every connection to an SQLite index (an engine's ``connect`` event)."""
    if isinstance(dbapi_conn, sqlite3.Connection):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, which is what a C-STORE success promises.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite the parent folder is created and WAL switched on."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20
        )
        event.listen(engine, "connect", sqlite_pragmas)
        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade_schema(engine: Engine) -> None:
    """Bring the index schema to the newest migration (idempotent)."""
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    logger.debug("index schema at head: %s", sorted(inspect(engine).get_table_names()))


def index_location(url: str) -> str:
    """Where the index of ``url`` lies, for messages: the SQLite file, or the URL without its
    password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def missing_index(url: str) -> str | None:
    """None when ``url`` holds a dicomnode index; otherwise why not ("" when there is nothing
    at all). Creates nothing: no folder, no SQLite file, no table.

    Raises SQLAlchemyError when a database server cannot be reached or refuses us.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            return "an in-memory SQLite database holds nothing outside the node"
        if not Path(path).exists():
            return ""
        if not Path(path).is_file():
            return "it is not a file"
        try:
            # Read-only, so that a file that is not ours is left exactly as it is.
            conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
            try:
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return f"it is not an SQLite database ({exc})"
    else:
        engine = create_engine(url, poolclass=NullPool)
        try:
            tables = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
    if not _INDEX_TABLES.issubset(tables):
        return "it has no dicomnode tables" if tables else "it is an empty database"
    return None
