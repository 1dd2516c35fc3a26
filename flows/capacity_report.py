"""``capacity-report``: CPU, memory and disk per host, headroom, trend and time to full.

Usage is measured over SSH on every host (load per CPU, memory available, the filesystem of the
host's root); request rates come from Prometheus for services with a ``prometheus_job`` when
Prometheus is configured and up (otherwise the column says so). Earlier runs' disk samples
(audit events ``capacity.usage`` and ``maintenance.disk_usage``) give the growth trend; pure
rules (:mod:`kmpops.plans.capacity`) decide ok / watch / act per host. Read-only; the samples of
this run are appended to the audit chain for the next run's trend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from kmpops.connectors.metrics import PrometheusClient
from kmpops.errors import KmpOpsError
from kmpops.plans.capacity import CapacityThresholds, HostUsage, Sample, assess_host
from tasks.common import audit, ops_config, records
from tasks.reports import host_usage, markdown_table, publish_report


class CapacityRequest(BaseModel):
    """Which hosts and which thresholds."""

    environment: str | None = Field(default=None, description="default: every environment")
    thresholds: CapacityThresholds = Field(default_factory=CapacityThresholds)
    rate_window: str = Field(default="5m", pattern=r"^[0-9]+[smh]$")


def collect_usage(environment: str | None) -> tuple[dict[str, HostUsage], dict[str, str]]:
    """Usage of every host of ``environment`` (all by default) and the error per failed host."""
    cfg = ops_config()
    envs = [cfg.environment(environment)] if environment else list(cfg.environments.values())
    names = [h.name for env in envs for h in env.hosts]
    futures = {name: host_usage.submit(name) for name in names}
    usage: dict[str, HostUsage] = {}
    failed: dict[str, str] = {}
    for name, fut in futures.items():
        try:
            usage[name] = fut.result()
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return usage, failed


def request_rates(window: str) -> tuple[dict[str, float], str]:
    """Requests per second per host from Prometheus (by the service's metrics URL address)."""
    cfg = ops_config()
    if cfg.prometheus is None:
        return {}, "no Prometheus configured"
    client = PrometheusClient(cfg.prometheus.url)
    rates: dict[str, float] = {}
    try:
        for name, svc in cfg.services.items():
            if svc.metrics is None or not svc.metrics.prometheus_job or not svc.metrics.url:
                continue
            by_instance: dict[str, str] = {}
            for env in cfg.environments.values():
                for host in env.hosts:
                    url = svc.render(svc.metrics.url, host)
                    by_instance[url.split("://", 1)[-1].split("/", 1)[0]] = host.name
            job = svc.metrics.prometheus_job
            query = f'sum by (instance) (rate({name}_requests_total{{job="{job}"}}[{window}]))'
            for sample in client.query(query):
                host_name = by_instance.get(sample.labels.get("instance", ""))
                if host_name:
                    rates[host_name] = rates.get(host_name, 0.0) + sample.value
    except KmpOpsError as exc:
        return rates, f"Prometheus: {type(exc).__name__}: {exc}"
    return rates, f"Prometheus {cfg.prometheus.url}"


def disk_history(host: str) -> list[Sample]:
    """Earlier used-kb samples of a host's filesystem from the audit chain."""
    samples = []
    rec = records()
    for ev in rec.audit_events(action="capacity.usage"):
        value = ev.details.get("hosts", {}).get(host, {}).get("disk_used_kb")
        if value is not None:
            samples.append(Sample(ev.ts, float(value)))
    for ev in rec.audit_events(action="maintenance.disk_usage"):
        value = ev.details.get("hosts", {}).get(host, {}).get("fs_used_kb")
        if value:
            samples.append(Sample(ev.ts, float(value)))
    return samples


@flow(name="capacity-report", task_runner=ThreadPoolTaskRunner(max_workers=16))
def capacity_report(request: CapacityRequest | None = None) -> dict[str, Any]:
    """Measure, assess and publish capacity per host; returns the rows and the hosts to act on.

    An unreachable host is reported, not fatal. Raises KeyError for an unknown environment.
    """
    req = request or CapacityRequest()
    logger = get_run_logger()
    now = datetime.now(UTC)
    usage, failed = collect_usage(req.environment)
    rates, rate_source = request_rates(req.rate_window)
    rows = []
    for name, u in usage.items():
        history = [*disk_history(name), Sample(now, float(u.disk_used_kb))]
        cap = assess_host(u, req.thresholds, history)
        rows.append(
            {
                "host": name,
                "status": cap.status,
                "cpus": u.cpus,
                "cpu_used_pct": u.cpu_used_pct,
                "memory_used_pct": round(u.mem_used_pct, 1),
                "disk_used_pct": round(u.disk_used_pct, 1),
                "disk_growth_mb_per_day": None
                if cap.disk_growth_kb_per_day is None
                else round(cap.disk_growth_kb_per_day / 1024, 2),
                "days_until_disk_full": cap.days_until_disk_full,
                "requests_per_s": round(rates[name], 2) if name in rates else None,
                "reasons": "; ".join(cap.reasons),
            }
        )
    for name, error in failed.items():
        rows.append({"host": name, "status": "unknown", "reasons": error})
    act = [r["host"] for r in rows if r["status"] in ("act", "unknown")]
    md = (
        "# Capacity report\n\n"
        f"{len(usage)} hosts measured, {len(failed)} unreachable; request rates: {rate_source}.\n"
        + (f"\n**Act on:** {', '.join(act)}\n" if act else "\nNo host needs action.\n")
        + "\n"
        + markdown_table(rows)
        + "\n"
    )
    publish_report("capacity-report", md, rows, description="capacity per host")
    audit(
        "capacity.usage",
        req.environment or "all",
        hosts={
            n: {
                "cpu_used_pct": u.cpu_used_pct,
                "mem_used_kb": u.mem_used_kb,
                "disk_used_kb": u.disk_used_kb,
                "disk_total_kb": u.disk_total_kb,
            }
            for n, u in usage.items()
        },
        act=act,
    )
    logger.info("capacity: %d hosts, act on %s", len(rows), act or "none")
    return {"rows": rows, "act": act, "rate_source": rate_source}
