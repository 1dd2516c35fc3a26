"""The only way kmp-ops creates Prefect artifacts: every text is redacted first.

Prefect stores an artifact as it is given and shows it to anyone who can read the UI or the
API, and reports carry log lines, command output and free text typed by people (a reason, a
symptom). These wrappers keep Prefect's signatures and pass every string — markdown, table
cells and column names, descriptions — through :func:`kmpops.redact.redact` (known secret
values and secret-looking patterns become ``***``). Flows and tasks import artifact functions
from here, never from ``prefect.artifacts`` (a test checks the sources).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect import artifacts as _prefect

from kmpops.redact import redact

__all__ = [
    "create_markdown_artifact",
    "create_progress_artifact",
    "create_table_artifact",
    "redact_value",
    "update_progress_artifact",
]


def redact_value(value: Any) -> Any:
    """``value`` with every string in it redacted (dicts, lists and tuples walked; keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def _description(description: str | None) -> str | None:
    return redact(description) if description else description


def create_markdown_artifact(
    markdown: str, key: str | None = None, description: str | None = None
) -> UUID:
    """Prefect's ``create_markdown_artifact`` with the markdown and description redacted."""
    return _prefect.create_markdown_artifact(
        markdown=redact(markdown), key=key, description=_description(description)
    )


def create_table_artifact(
    table: Any, key: str | None = None, description: str | None = None
) -> UUID:
    """Prefect's ``create_table_artifact`` with every cell, column name and the description
    redacted (a list of rows, a dict of columns or a list of lists)."""
    return _prefect.create_table_artifact(
        table=redact_value(table), key=key, description=_description(description)
    )


def create_progress_artifact(
    progress: float, key: str | None = None, description: str | None = None
) -> UUID:
    """Prefect's ``create_progress_artifact`` with the description redacted."""
    return _prefect.create_progress_artifact(
        progress=progress, key=key, description=_description(description)
    )


def update_progress_artifact(
    artifact_id: UUID, progress: float, description: str | None = None, **kwargs: Any
) -> UUID:
    """Prefect's ``update_progress_artifact`` with the description redacted."""
    return _prefect.update_progress_artifact(
        artifact_id=artifact_id, progress=progress, description=_description(description), **kwargs
    )
