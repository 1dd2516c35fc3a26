"""Flow tests run against the session stack's PostgreSQL-backed Prefect server."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _prefect_server(stack: object) -> None:
    """Every flow test needs the stack (and its Prefect server) up."""
