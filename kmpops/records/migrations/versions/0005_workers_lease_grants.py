"""lease_grants: the history of every lease (who held which target under which fence, when)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import kmpops.records.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lease_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("holder_name", sa.String(length=300), nullable=False),
        sa.Column("acquired_at", kmpops.records.models.UTCDateTime(), nullable=False),
        sa.Column("ended_at", kmpops.records.models.UTCDateTime(), nullable=True),
        sa.Column("ended_how", sa.String(length=20), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("target", "fence"),
    )
    with op.batch_alter_table("lease_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lease_grants_target"), ["target"], unique=False)
        batch_op.create_index(batch_op.f("ix_lease_grants_holder"), ["holder"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("lease_grants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lease_grants_holder"))
        batch_op.drop_index(batch_op.f("ix_lease_grants_target"))
    op.drop_table("lease_grants")
