"""quarantine records name their input

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 19:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: records quarantined before this revision keep NULL (their .reason.json file
    # still has the original name).
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.add_column(sa.Column("original_name", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("sop_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("calling_ae", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("peer_address", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.drop_column("peer_address")
        batch_op.drop_column("calling_ae")
        batch_op.drop_column("sop_instance_uid")
        batch_op.drop_column("original_name")
