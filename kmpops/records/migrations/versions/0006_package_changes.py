"""package_changes and pending_updates: what patch-hosts changed per host, and when each
pending update was first seen

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import kmpops.records.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "package_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("environment", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=100), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("from_version", sa.String(length=200), nullable=True),
        sa.Column("to_version", sa.String(length=200), nullable=False),
        sa.Column("after_version", sa.String(length=200), nullable=True),
        sa.Column("security", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("batch", sa.String(length=100), nullable=False),
        sa.Column("at", kmpops.records.models.UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("package_changes", schema=None) as batch_op:
        for column in ("run_id", "environment", "host", "package", "outcome"):
            batch_op.create_index(batch_op.f(f"ix_package_changes_{column}"), [column])
    op.create_table(
        "pending_updates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=100), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("security", sa.Boolean(), nullable=False),
        sa.Column("first_seen", kmpops.records.models.UTCDateTime(), nullable=False),
        sa.Column("last_seen", kmpops.records.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("host", "package", "version"),
    )
    with op.batch_alter_table("pending_updates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pending_updates_host"), ["host"])


def downgrade() -> None:
    with op.batch_alter_table("pending_updates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pending_updates_host"))
    op.drop_table("pending_updates")
    with op.batch_alter_table("package_changes", schema=None) as batch_op:
        for column in ("outcome", "package", "host", "environment", "run_id"):
            batch_op.drop_index(batch_op.f(f"ix_package_changes_{column}"))
    op.drop_table("package_changes")
