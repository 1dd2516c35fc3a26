"""The guide's regular maintenance: ``maintenance-daily``, ``maintenance-weekly``, ``-monthly``.

They compose the other procedures as subflows. Each subflow is imported inside the flow
function (a missing module is reported as ``skipped``, it does not break this module's import)
and run with ``return_state=True``, so one failing part is reported and the others still run.

* daily: health of every host (``troubleshoot``), log volume per service and host, backup
  status from the records (+ ``verify-backups``), alert review (``evaluate-alerts``: a
  critical alert firing opens its incident, like every evaluation).
* weekly: disk usage per host recorded on the audit chain and its trend over earlier weeks
  (growth per day, days until full); pruning of old releases beyond ``keep_releases`` (never
  the current or previous one) — a dry-run report unless ``apply_pruning``.
* monthly: ``compliance-audit``, ``capacity-report``, ``cost-report``, ``access-review``.
"""

from __future__ import annotations

import importlib
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from kmpops import release as rel
from kmpops.connectors.ssh import SSHConnection
from kmpops.plans.capacity import Sample, days_until_full, linear_trend
from tasks.common import audit, ops_config, records, retry_on_transient
from tasks.diagnostics import gather_host_facts
from tasks.reports import markdown_table, publish_report

__all__ = [
    "DailyOptions",
    "WeeklyOptions",
    "maintenance_daily",
    "maintenance_monthly",
    "maintenance_weekly",
    "releases_to_prune",
]


def _part(name: str, status: str, detail: str, **data: Any) -> dict[str, Any]:
    return {"part": name, "status": status, "detail": detail, **data}


def run_subflow(part: str, module: str, attr: str, **kwargs: Any) -> dict[str, Any]:
    """Run flow ``module.attr`` as a subflow; report ok / failed / skipped, never raise."""
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        return _part(part, "skipped", f"{module}.{attr} not available ({exc})")
    state = fn(return_state=True, **kwargs)
    if state.is_completed():
        result = state.result(raise_on_failure=False)
        return _part(part, "ok", state.message or "completed", result=result)
    exc = state.result(raise_on_failure=False)
    detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else state.name
    return _part(part, "failed", detail)


def _hosts(environment: str | None) -> list[str]:
    cfg = ops_config()
    envs = [cfg.environment(environment)] if environment else list(cfg.environments.values())
    return [h.name for env in envs for h in env.hosts]


def _publish(kind: str, parts: list[dict[str, Any]], extra_md: str = "") -> None:
    rows = [{"part": p["part"], "status": p["status"], "detail": p["detail"]} for p in parts]
    failed = [p for p in parts if p["status"] == "failed"]
    title = f"# Maintenance ({kind}) — {'problems found' if failed else 'all parts ok'}"
    md = f"{title}\n\n{markdown_table(rows)}\n" + (f"\n{extra_md}\n" if extra_md else "")
    publish_report(f"maintenance-{kind}", md, rows, description=f"{kind} maintenance")
    audit(
        f"maintenance.{kind}",
        "maintenance",
        parts={p["part"]: p["status"] for p in parts},
    )


# -- daily ----------------------------------------------------------------------------------


class DailyOptions(BaseModel):
    """What the daily run covers."""

    environment: str | None = Field(default=None, description="default: every environment")
    service: str | None = Field(default="web", description="service whose health is checked")
    verify_backups: bool = Field(default=True, description="run verify-backups")
    review_alerts: bool = Field(default=True, description="run evaluate-alerts")
    log_volume_warning_mb: float = Field(default=500.0, gt=0)


@task(
    name="log-volume",
    task_run_name="log-volume-{host_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
)
def log_volume(host_name: str) -> dict[str, int]:
    """KB of logs per service on a host (``<deploy_path>/shared/log``; 0 when absent)."""
    cfg = ops_config()
    _env, host = cfg.host(host_name)
    sizes: dict[str, int] = {}
    with SSHConnection.from_host(host) as conn:
        for name, svc in cfg.services.items():
            log_dir = f"{svc.deploy_path_for(host)}/shared/log"
            result = conn.run(["du", "-sk", log_dir], timeout=60)
            words = result.stdout.split()
            sizes[name] = int(words[0]) if result.ok and words and words[0].isdigit() else 0
    return sizes


def backup_status(now: datetime) -> list[dict[str, Any]]:
    """Newest complete backup per database and per configuration subject, with its age."""
    rows = []
    seen: set[tuple[str, str]] = set()
    for b in records().backups(states=("complete",)):
        if (b.kind, b.name) in seen:
            continue
        seen.add((b.kind, b.name))
        rows.append(
            {
                "kind": b.kind,
                "name": b.name,
                "backup": b.id,
                "age": str(now - b.started_at).split(".")[0],
                "verification": b.verification or "not verified",
            }
        )
    for name in ops_config().databases:
        if ("database", name) not in seen:
            rows.append(
                {"kind": "database", "name": name, "backup": None, "age": "", "verification": ""}
            )
    return rows


@flow(name="maintenance-daily", task_runner=ThreadPoolTaskRunner(max_workers=16))
def maintenance_daily(options: DailyOptions | None = None) -> dict[str, Any]:
    """Daily checks: host health, log volume, backup status and verification, alert review.

    Never raises for a failing part: the report and the return value say which parts failed.
    """
    opts = options or DailyOptions()
    now = datetime.now(UTC)
    parts: list[dict[str, Any]] = []
    from flows.troubleshoot import TroubleshootRequest

    health = run_subflow(
        "host health",
        "flows.troubleshoot",
        "troubleshoot",
        request=TroubleshootRequest(
            environment=opts.environment, service=opts.service, symptom="daily health check"
        ),
    )
    if health["status"] == "ok":
        found = health["result"]["findings"]
        critical = [f for f in found if f["severity"] == "critical"]
        health["detail"] = (
            f"{len(health['result']['hosts'])} hosts, {len(found)} findings "
            f"({len(critical)} critical), level {health['result']['level']}"
        )
        health["status"] = "failed" if critical else "ok"
    parts.append(health)

    hosts = _hosts(opts.environment)
    futures = {name: log_volume.submit(name) for name in hosts}
    volumes: dict[str, dict[str, int] | str] = {}
    for name, fut in futures.items():
        try:
            volumes[name] = fut.result()
        except Exception as exc:
            volumes[name] = f"{type(exc).__name__}: {exc}"
    big = [
        f"{h}/{svc} {kb / 1024:.0f} MB"
        for h, v in volumes.items()
        if isinstance(v, dict)
        for svc, kb in v.items()
        if kb / 1024 >= opts.log_volume_warning_mb
    ]
    unreachable = [h for h, v in volumes.items() if isinstance(v, str)]
    total_kb = sum(kb for v in volumes.values() if isinstance(v, dict) for kb in v.values())
    parts.append(
        _part(
            "log volume",
            "failed" if big or unreachable else "ok",
            f"{total_kb / 1024:.1f} MB of logs on {len(hosts)} hosts"
            + (f"; over {opts.log_volume_warning_mb:g} MB: {', '.join(big)}" if big else "")
            + (f"; unreachable: {', '.join(unreachable)}" if unreachable else ""),
            volumes=volumes,
        )
    )

    status_rows = backup_status(now)
    missing = [r["name"] for r in status_rows if r["backup"] is None]
    parts.append(
        _part(
            "backup status",
            "failed" if missing else "ok",
            f"{len(status_rows)} backup subjects"
            + (f"; no complete backup of: {', '.join(missing)}" if missing else ""),
            backups=status_rows,
        )
    )
    if opts.verify_backups:
        parts.append(run_subflow("backup verification", "flows.verify_backups", "verify_backups"))
    if opts.review_alerts:
        parts.append(
            # like any evaluation: a critical alert firing now opens its incident (once) and
            # starts the response through the incident-response deployment's trigger
            run_subflow(
                "alert review", "flows.evaluate_alerts", "evaluate_alerts", start_incidents="event"
            )
        )
    _publish("daily", parts, "## Backups\n\n" + markdown_table(status_rows))
    return {"parts": [{k: v for k, v in p.items() if k != "result"} for p in parts]}


# -- weekly ---------------------------------------------------------------------------------


class WeeklyOptions(BaseModel):
    """What the weekly run covers."""

    environment: str | None = Field(default=None, description="default: every environment")
    services: list[str] = Field(default_factory=list, description="default: every service")
    apply_pruning: bool = Field(default=False, description="delete old releases (else report)")
    horizon_days: float = Field(default=30.0, gt=0, description="warn if a disk fills sooner")


def releases_to_prune(
    releases_newest_first: list[str], keep: int, protect: set[str | None]
) -> list[str]:
    """Releases beyond the ``keep`` newest, except protected ones (current, previous)."""
    return [r for r in releases_newest_first[keep:] if r not in protect]


@task(
    name="plan-release-pruning",
    task_run_name="prune-{service}-{host_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
)
def prune_releases_on_host(service: str, host_name: str, apply: bool) -> dict[str, Any]:
    """Which releases of ``service`` on a host go (and, with ``apply``, remove them).

    Never removes the current release nor the previous one recorded in the records.
    """
    cfg = ops_config()
    env, host = cfg.host(host_name)
    svc = cfg.service(service)
    path = svc.deploy_path_for(host)
    prev = records().previous_release(service, env, host_name)
    protect = {prev.version if prev else None}
    with SSHConnection.from_host(host) as conn:
        releases = rel.list_releases(conn, path)
        current = rel.current_release(conn, path)
        doomed = releases_to_prune(releases, svc.keep_releases, protect | {current})
        removed: list[str] = []
        if apply and doomed:
            removed = rel.prune_releases(conn, path, keep=svc.keep_releases, protect=list(protect))
    return {
        "service": service,
        "host": host_name,
        "releases": len(releases),
        "current": current,
        "keep": svc.keep_releases,
        "prune": doomed,
        "removed": removed,
    }


@flow(name="maintenance-weekly", task_runner=ThreadPoolTaskRunner(max_workers=16))
def maintenance_weekly(options: WeeklyOptions | None = None) -> dict[str, Any]:
    """Weekly: disk usage and its trend per host; release pruning (dry run unless applied)."""
    opts = options or WeeklyOptions()
    logger = get_run_logger()
    cfg = ops_config()
    now = datetime.now(UTC)
    hosts = _hosts(opts.environment)
    services = opts.services or list(cfg.services)
    for name in services:
        cfg.service(name)
    parts: list[dict[str, Any]] = []

    facts_futures = {h: gather_host_facts.submit(h, None, 0) for h in hosts}
    history = records().audit_events(action="maintenance.disk_usage")
    trend_rows = []
    samples: dict[str, dict[str, int]] = {}
    for host, fut in facts_futures.items():
        try:
            facts = fut.result()
        except Exception as exc:
            trend_rows.append({"host": host, "used_mb": None, "note": f"unreachable: {exc}"})
            continue
        used = facts.root_used_kb if facts.root_used_kb is not None else 0
        disk = facts.disk
        samples[host] = {
            "root_used_kb": used,
            "fs_used_kb": disk.used_kb if disk else 0,
            "fs_size_kb": disk.size_kb if disk else 0,
        }
        series = [
            Sample(ev.ts, float(ev.details["hosts"][host]["root_used_kb"]))
            for ev in history
            if host in ev.details.get("hosts", {})
        ] + [Sample(now, float(used))]
        growth = linear_trend(series)
        days = None
        if disk is not None and growth is not None:
            days = days_until_full(disk.used_kb, disk.used_kb + disk.available_kb, growth)
        trend_rows.append(
            {
                "host": host,
                "used_mb": round(used / 1024, 1),
                "fs_used_pct": round(disk.used_pct, 1) if disk else None,
                "samples": len(series),
                "growth_mb_per_day": None if growth is None else round(growth / 1024, 2),
                "days_until_full": None if days is None else round(days, 1),
            }
        )
    audit("maintenance.disk_usage", "maintenance", hosts=samples)
    filling = [
        r["host"] for r in trend_rows if (r.get("days_until_full") or 1e9) < opts.horizon_days
    ]
    parts.append(
        _part(
            "disk usage trend",
            "failed" if filling or len(samples) < len(hosts) else "ok",
            f"{len(samples)}/{len(hosts)} hosts measured"
            + (
                f"; filling within {opts.horizon_days:g} days: {', '.join(filling)}"
                if filling
                else ""
            ),
            trend=trend_rows,
        )
    )

    prune_futures = [
        prune_releases_on_host.submit(svc, h, opts.apply_pruning) for svc in services for h in hosts
    ]
    prune_rows = []
    errors = []
    for fut in prune_futures:
        try:
            prune_rows.append(fut.result())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    doomed = sum(len(r["prune"]) for r in prune_rows)
    removed = sum(len(r["removed"]) for r in prune_rows)
    verb = f"removed {removed}" if opts.apply_pruning else f"dry run: would remove {doomed}"
    parts.append(
        _part(
            "release pruning",
            "failed" if errors else "ok",
            f"{verb} old releases on {len(prune_rows)} service/host pairs"
            + (f"; errors: {'; '.join(errors)}" if errors else ""),
            pruning=prune_rows,
        )
    )
    table = [
        {**r, "prune": ", ".join(r["prune"]), "removed": ", ".join(r["removed"])}
        for r in prune_rows
    ]
    _publish(
        "weekly",
        parts,
        "## Disk usage trend\n\n"
        + markdown_table(trend_rows)
        + "\n\n## Release pruning\n\n"
        + markdown_table(table),
    )
    logger.info("weekly maintenance: %s", "; ".join(p["detail"] for p in parts))
    return {"parts": parts}


# -- monthly --------------------------------------------------------------------------------


@flow(name="maintenance-monthly")
def maintenance_monthly(
    include: list[str] | None = None,
) -> dict[str, Any]:
    """Monthly: compliance audit, capacity report, cost report, access review (as subflows).

    ``include`` limits the parts (names: compliance, capacity, cost, access). Never raises for
    a failing part.
    """
    plan = {
        "compliance": ("compliance audit", "flows.compliance_audit", "compliance_audit"),
        "capacity": ("capacity report", "flows.capacity_report", "capacity_report"),
        "cost": ("cost report", "flows.cost_report", "cost_report"),
        "access": ("access review", "flows.access_review", "access_review"),
    }
    chosen = include or list(plan)
    unknown = set(chosen) - set(plan)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)} (known: {', '.join(plan)})")
    parts = []
    for key in chosen:
        part = run_subflow(*plan[key])
        result = part.get("result")
        if key == "compliance" and part["status"] == "ok" and isinstance(result, dict):
            failures = result.get("critical_failures", [])
            part["status"] = "failed" if failures else "ok"
            part["detail"] = (
                f"{len(result.get('checks', []))} checks, {len(failures)} critical failures"
                + (f": {'; '.join(failures)}" if failures else "")
            )
        parts.append(part)
    _publish("monthly", parts)
    return {"parts": [{k: v for k, v in p.items() if k != "result"} for p in parts]}
