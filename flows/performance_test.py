"""``performance-test``: a bounded load run against a service on loopback, compared with a baseline.

Drives ``requests`` GETs over ``concurrency`` keep-alive connections at the service's URL on one
host (or an explicit loopback URL), reports p50/p95/p99 latency, error rate and throughput,
and compares them with the latest baseline stored on the audit chain (``performance.baseline``
events for the same subject). A regression beyond :class:`RegressionPolicy` fails the run
(PolicyViolation) after the report is published; a passing run becomes the new baseline when
``save_baseline`` (the first run always does).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from kmpops.errors import PolicyViolation
from kmpops.plans.capacity import RegressionPolicy, compare_with_baseline
from kmpops.shellsafe import validate_name
from tasks.common import audit, ops_config, records
from tasks.reports import MAX_CONCURRENCY, MAX_REQUESTS, drive_load, markdown_table, publish_report


class PerformanceRequest(BaseModel):
    """What to load, how hard, and what counts as a regression."""

    service: str = Field(default="web")
    host: str | None = Field(default=None, description="default: the first staging host")
    path: str = Field(default="/work", pattern=r"^/[A-Za-z0-9._~/-]*$")
    url: str | None = Field(default=None, description="explicit loopback URL (overrides host)")
    requests: int = Field(default=500, ge=1, le=MAX_REQUESTS)
    concurrency: int = Field(default=8, ge=1, le=MAX_CONCURRENCY)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    regression: RegressionPolicy = Field(default_factory=RegressionPolicy)
    save_baseline: bool = Field(default=False, description="a passing run becomes the baseline")


def target_url(req: PerformanceRequest) -> tuple[str, str]:
    """(subject, URL): the service's health URL's origin on the host, plus ``path``."""
    cfg = ops_config()
    validate_name(req.service, what="service")
    svc = cfg.service(req.service)
    if req.url:
        return f"{req.service}@{req.url}", req.url
    if req.host:
        _env, host = cfg.host(req.host)
    else:
        env = cfg.environments.get("staging") or next(iter(cfg.environments.values()))
        host = env.hosts[0]
    if not svc.health_check.url:
        raise ValueError(f"service {req.service} has no health URL to derive the target from")
    health = svc.render(svc.health_check.url, host)
    origin = health.split("://", 1)[0] + "://" + health.split("://", 1)[1].split("/", 1)[0]
    return f"{req.service}@{host.name}", origin + req.path


def latest_baseline(subject: str) -> dict[str, float] | None:
    """The newest baseline recorded for ``subject``, or None."""
    events = records().audit_events(action="performance.baseline", subject=subject)
    return dict(events[-1].details["summary"]) if events else None


@task(name="drive-load", cache_policy=NO_CACHE)
def run_load(url: str, requests: int, concurrency: int, timeout_s: float) -> dict[str, float]:
    """One bounded load run; returns its summary (latency percentiles in ms, rates)."""
    return drive_load(url, requests=requests, concurrency=concurrency, timeout=timeout_s).summary()


@flow(name="performance-test")
def performance_test(request: PerformanceRequest | None = None) -> dict[str, Any]:
    """Load, measure, compare with the baseline, publish; raise PolicyViolation on regression.

    Raises UnsafeValueError for a non-loopback target before sending anything.
    """
    req = request or PerformanceRequest()
    logger = get_run_logger()
    subject, url = target_url(req)
    baseline = latest_baseline(subject)
    summary = run_load(url, req.requests, req.concurrency, req.timeout_s)
    problems = compare_with_baseline(summary, baseline, req.regression)
    rows = [{"run": "current", **summary}]
    if baseline:
        rows.append({"run": "baseline", **baseline})
    verdict = "REGRESSION" if problems else "PASS"
    md = (
        f"# Performance test — {verdict}\n\n"
        f"Target `{url}`: {req.requests} requests, concurrency {req.concurrency}.\n\n"
        + markdown_table(rows)
        + "\n\n"
        + ("\n".join(f"- {p}" for p in problems) if problems else "No regression.")
        + ("" if baseline else "\n\nNo baseline yet: this run becomes the baseline.")
        + "\n"
    )
    publish_report("performance-test", md, rows, description=f"{subject}: {verdict}")
    audit("performance.test", subject, summary=summary, baseline=baseline, problems=problems)
    if not problems and (req.save_baseline or baseline is None):
        audit("performance.baseline", subject, summary=summary)
    logger.info("performance %s: %s %s", subject, verdict, summary)
    if problems:
        raise PolicyViolation(f"performance regression on {subject}: " + "; ".join(problems))
    return {"subject": subject, "summary": summary, "baseline": baseline, "problems": problems}
