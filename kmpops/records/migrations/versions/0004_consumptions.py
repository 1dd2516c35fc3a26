"""consumptions: one-time uses of change requests and approval answers

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import kmpops.records.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consumptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("at", kmpops.records.models.UTCDateTime(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("consumptions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_consumptions_kind"), ["kind"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("consumptions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consumptions_kind"))
    op.drop_table("consumptions")
