"""Report helpers shared by the reporting flows: markdown tables, artifacts, check results.

A :class:`CheckResult` is one policy check with its evidence (compliance-audit, maintenance);
``publish_report`` writes a markdown artifact and a table artifact under stable keys so the
Prefect UI shows the latest report of each kind. Nothing here reads secrets.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from kmpops.errors import UnsafeValueError
from kmpops.plans.capacity import HostUsage, LoadResult
from kmpops.plans.diagnosis import HostFacts
from tasks.artifacts import create_markdown_artifact, create_table_artifact
from tasks.common import STEP_TIMEOUT_S, retry_on_transient

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_REQUESTS",
    "CheckResult",
    "artifact_key",
    "drive_load",
    "host_usage",
    "markdown_table",
    "publish_report",
    "usage_from_facts",
]

MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 64
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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


def usage_from_facts(facts: HostFacts) -> HostUsage:
    """Capacity usage from diagnostic facts: CPU from the 1-minute load per CPU (capped)."""
    disk = facts.disk
    return HostUsage(
        host=facts.host,
        cpus=facts.cpus,
        cpu_used_pct=round(min(100.0, 100.0 * facts.load[0] / max(1, facts.cpus)), 1),
        mem_total_kb=facts.mem_total_kb,
        mem_used_kb=max(0, facts.mem_total_kb - facts.mem_available_kb),
        disk_total_kb=(disk.used_kb + disk.available_kb) if disk else 0,
        disk_used_kb=disk.used_kb if disk else 0,
    )


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="host-usage",
    task_run_name="usage-{host_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
)
def host_usage(host_name: str) -> HostUsage:
    """CPU, memory and disk of one host, measured over SSH (read-only)."""
    from tasks.diagnostics import gather_host_facts

    return usage_from_facts(gather_host_facts.fn(host_name, None, 0))


def drive_load(url: str, *, requests: int, concurrency: int, timeout: float = 5.0) -> LoadResult:
    """Send ``requests`` GETs to a loopback ``url`` over ``concurrency`` keep-alive connections.

    A 5xx answer or a failed request counts as an error (its latency is not counted). Raises
    UnsafeValueError for a URL that is not http on loopback, ValueError for counts out of range.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
        raise UnsafeValueError(f"load only goes to http on loopback, not {url!r}")
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests must be between 1 and {MAX_REQUESTS}, got {requests}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    remaining = [requests]
    lock = threading.Lock()

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def worker() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        conn: http.client.HTTPConnection | None = None
        while take():
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status >= 500:
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - started)
            except (OSError, http.client.HTTPException):
                errors += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load") as pool:
        results = list(pool.map(lambda _: worker(), range(concurrency)))
    seconds = time.perf_counter() - started
    latencies = tuple(x for lat, _ in results for x in lat)
    return LoadResult(latencies, sum(e for _, e in results), requests, seconds)
