"""Engine and schema set-up for the index (SQLite in WAL mode, or PostgreSQL)."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect

__all__ = ["alembic_config", "make_engine", "sqlite_pragmas", "upgrade_schema", "utcnow"]

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


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
