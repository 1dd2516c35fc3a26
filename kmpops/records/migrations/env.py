"""Alembic environment: runs on the connection handed in by ``Records.migrate()`` or on the URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import kmpops.records.models as models

target_metadata = models.Base.metadata


def run() -> None:
    """Run migrations online (the records store is always reachable when migrating)."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(
            connection=conn,
            target_metadata=target_metadata,
            render_as_batch=conn.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run()
