"""Report helpers shared by the reporting flows: markdown tables, artifacts, check results.

A :class:`CheckResult` is one policy check with its evidence (compliance-audit, maintenance);
``publish_report`` writes a markdown artifact and a table artifact under stable keys so the
Prefect UI shows the latest report of each kind. Nothing here reads secrets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prefect.artifacts import create_markdown_artifact, create_table_artifact

__all__ = ["CheckResult", "artifact_key", "markdown_table", "publish_report"]


@dataclass(frozen=True)
class CheckResult:
    """One check: its outcome, how much a failure matters, and the evidence for the outcome."""

    check: str
    ok: bool
    severity: Literal["critical", "warning", "info"] = "critical"
    evidence: str = ""
    subject: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The check as one table row."""
        return {
            "check": self.check,
            "subject": self.subject,
            "result": "PASS" if self.ok else "FAIL",
            "severity": self.severity,
            "evidence": self.evidence,
        }

    def as_dict(self) -> dict[str, Any]:
        """The check as plain data (flow results, audit details)."""
        return asdict(self)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (columns: given, or the first row's keys)."""
    if not rows:
        return "_(none)_"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def artifact_key(text: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) made from ``text``."""
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", key) or "report"


def publish_report(
    key: str,
    markdown: str,
    rows: Iterable[Mapping[str, Any]] | None = None,
    *,
    description: str = "",
) -> None:
    """Create the markdown artifact ``key`` and, with ``rows``, the table artifact ``key-table``.

    Must run inside a flow or task run.
    """
    key = artifact_key(key)
    create_markdown_artifact(key=key, markdown=markdown, description=description or None)
    if rows is not None:
        table = [dict(r) for r in rows]
        create_table_artifact(key=f"{key}-table", table=table, description=description or None)
