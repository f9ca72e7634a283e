"""Alembic environment: the connection comes from dicomnode, never from an ini file."""

from __future__ import annotations

from alembic import context

from storage.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via storage.db.upgrade_schema
    raise RuntimeError("run migrations through 'dicomnode db upgrade'")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
