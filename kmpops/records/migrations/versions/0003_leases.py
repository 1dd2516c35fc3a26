"""leases (target locks with fencing numbers); the fence a release or backup was written under

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-02 14:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import kmpops.records.models

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=True),
        sa.Column("holder_name", sa.String(length=300), nullable=False),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("acquired_at", kmpops.records.models.UTCDateTime(), nullable=True),
        sa.Column("renewed_at", kmpops.records.models.UTCDateTime(), nullable=True),
        sa.Column("expires_at", kmpops.records.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("target"),
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_leases_holder"), ["holder"], unique=False)
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fence", sa.Integer(), nullable=True))
    with op.batch_alter_table("backups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fence", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backups", schema=None) as batch_op:
        batch_op.drop_column("fence")
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_column("fence")
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_leases_holder"))
    op.drop_table("leases")
