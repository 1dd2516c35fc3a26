"""Verification steps of a deploy: the staging tests, and the analysis of the real service.

A service's ``analysis`` (ops.yaml) lists named measurements; :func:`mark_log_offsets` (before
a batch is switched) and :func:`begin_analysis` (right after) fix where the analysis starts,
:func:`run_analysis` takes the readings and judges them with :mod:`kmpops.plans.analysis`. A
measurement asks the configured Prometheus (its PromQL ``query``, ``{window}`` = the time since
the analysis began, ``{instances}`` = the hosts' metrics targets), or, with no Prometheus
configured, scrapes every host's metrics URL (``scrape``: counters and label matchers from
config); a ``log`` measurement counts new lines matching a pattern in the service's log since
the switch. Readings are cumulative since the analysis began. Nothing here names a service's
metrics: they all come from config.

:func:`run_staging_tests` runs the service's ``staging_tests`` (a command on each staging host or
locally, and/or a traffic profile) so the staging analysis has traffic to judge. Caching is off
everywhere; nothing here changes a host.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from kmpops import shellsafe
from kmpops.config import Measurement, OpsConfig, ServiceConfig
from kmpops.connectors import metrics
from kmpops.connectors.traffic import send_traffic
from kmpops.errors import KmpOpsError, PolicyViolation
from kmpops.plans.analysis import (
    AnalysisReport,
    Reading,
    ReadingResult,
    instances_regex,
    judge_analysis,
    judge_measurement,
    judge_reading,
    reading_interval,
    render_query,
    should_stop,
    window_text,
)
from tasks.common import STEP_TIMEOUT_S, audit, ops_config
from tasks.deploy import _host, _on_hosts, _values, host_connection

__all__ = [
    "AnalysisStart",
    "analyse_recovery",
    "begin_analysis",
    "mark_log_offsets",
    "run_analysis",
    "run_staging_tests",
]

FRESH_SCRAPE_TIMEOUT_S = 30.0  # how long begin_analysis waits for Prometheus to see the hosts
_LOG_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AnalysisStart:
    """Where an analysis of ``hosts`` begins: the time, each log measurement's byte offset per
    host (before the switch), and each host's baseline scrape (no-Prometheus measurements)."""

    service: str
    environment: str
    hosts: tuple[str, ...]
    started_at: float
    log_offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    baselines: dict[str, list[metrics.Sample] | str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _instances(cfg: OpsConfig, svc: ServiceConfig, env: str, hosts: tuple[str, ...]) -> list[str]:
    """``host:port`` of each host's metrics URL (how Prometheus labels its ``instance``)."""
    if svc.metrics is None or not svc.metrics.url:
        return []
    out = []
    for name in hosts:
        url = svc.render(svc.metrics.url, _host(cfg, env, name))
        out.append(url.split("://", 1)[-1].split("/", 1)[0])
    return out


def _log_path(svc: ServiceConfig, cfg: OpsConfig, env: str, host_name: str, m: Measurement) -> str:
    assert m.log is not None
    host = _host(cfg, env, host_name)
    return svc.render(m.log.path, host, deploy_path=svc.deploy_path_for(host))


@task(
    name="mark-log-offsets",
    cache_policy=NO_CACHE,
    task_run_name="log-offsets-{environment}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def mark_log_offsets(
    service: str, environment: str, host_names: list[str]
) -> dict[str, dict[str, int]]:
    """Before a switch: the size in bytes of each ``log`` measurement's file on each host
    (measurement -> host -> offset; 0 for a missing file). Read-only. Raises the first host's
    error naming every host that failed."""
    cfg = ops_config()
    svc = cfg.service(service)
    logs = [m for m in svc.analysis if m.log is not None]
    if not logs:
        return {}

    def one(env: str, host_name: str) -> dict[str, int]:
        sizes = {}
        with host_connection(_host(cfg, env, host_name)) as conn:
            for m in logs:
                path = shellsafe.quote(_log_path(svc, cfg, env, host_name, m))
                res = conn.run(f"stat -c %s {path} 2>/dev/null || echo 0", timeout=_LOG_TIMEOUT_S)
                text = res.stdout.strip()
                sizes[m.name] = int(text) if text.isdigit() else 0
        return sizes

    outcomes = _on_hosts(one, [(environment, h) for h in host_names])
    failed = {h: o for h, o in outcomes.items() if isinstance(o, Exception)}
    if failed:
        raise KmpOpsError("; ".join(f"{h}: {o}" for h, o in failed.items()))
    out: dict[str, dict[str, int]] = {m.name: {} for m in logs}
    for host, sizes in outcomes.items():
        assert isinstance(sizes, dict)
        for name, size in sizes.items():
            out[name][host] = size
    return out


def _prometheus(cfg: OpsConfig) -> metrics.PrometheusClient | None:
    return metrics.PrometheusClient(cfg.prometheus.url) if cfg.prometheus else None


def _wait_fresh_scrape(client: metrics.PrometheusClient, instances: list[str], since: float) -> str:
    """Wait (at most FRESH_SCRAPE_TIMEOUT_S) until Prometheus holds two *successful* scrapes
    (``up == 1``) of every instance taken after ``since``: ``increase()`` over the analysis
    window needs two samples, and the new processes' first samples must be in it. A scrape
    that failed (the process still starting) records ``up 0`` and no service metrics, so it
    does not count. Returns a note for the audit."""
    if not instances:
        return "no metrics targets for these hosts"
    wanted = len(set(instances))
    matcher = f'up{{instance=~"{instances_regex(instances)}"}}'
    deadline = time.monotonic() + FRESH_SCRAPE_TIMEOUT_S
    while time.monotonic() < deadline:
        window = window_text(time.time() - since)
        try:
            fewest = client.query(f"min(sum_over_time({matcher}[{window}]))")
            seen = client.query(f"count(count_over_time({matcher}[{window}]))")
        except metrics.MetricsUnavailable:
            fewest, seen = [], []
        if fewest and seen and fewest[0].value >= 2 and seen[0].value >= wanted:
            return f"Prometheus scraped all {wanted} targets successfully twice after the switch"
        time.sleep(0.25)
    return (
        f"Prometheus had not scraped every target successfully twice {FRESH_SCRAPE_TIMEOUT_S:g}s "
        "after the switch"
    )


@task(
    name="begin-analysis",
    cache_policy=NO_CACHE,
    task_run_name="begin-analysis-{environment}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def begin_analysis(
    service: str,
    environment: str,
    host_names: list[str],
    log_offsets: dict[str, dict[str, int]] | None = None,
) -> AnalysisStart:
    """Right after a switch: the analysis starts now. With Prometheus, waits (bounded) until it
    has scraped every host's new process; without, takes each host's baseline scrape for the
    ``scrape`` measurements (an unreachable host's baseline is its error: its readings are
    inconclusive). Read-only; never raises for a host."""
    cfg = ops_config()
    svc = cfg.service(service)
    hosts = tuple(host_names)
    started = time.time()
    notes: list[str] = []
    client = _prometheus(cfg)
    wants_query = any(m.query for m in svc.analysis)
    wants_scrape = any(m.scrape and not (client and m.query) for m in svc.analysis)
    if client is not None and wants_query:
        notes.append(_wait_fresh_scrape(client, _instances(cfg, svc, environment, hosts), started))
    baselines: dict[str, list[metrics.Sample] | str] = {}
    if wants_scrape:
        baselines = _scrape_hosts(cfg, svc, environment, hosts)
    return AnalysisStart(
        service, environment, hosts, started, dict(log_offsets or {}), baselines, tuple(notes)
    )


def _scrape_hosts(
    cfg: OpsConfig, svc: ServiceConfig, env: str, hosts: tuple[str, ...]
) -> dict[str, list[metrics.Sample] | str]:
    out: dict[str, list[metrics.Sample] | str] = {}
    for name in hosts:
        if svc.metrics is None or not svc.metrics.url:
            out[name] = "no metrics URL configured"
            continue
        try:
            out[name] = metrics.scrape(svc.render(svc.metrics.url, _host(cfg, env, name)))
        except KmpOpsError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _single(client: metrics.PrometheusClient, query: str) -> tuple[float | None, str]:
    """The value of a query that returns one sample; (None, why) otherwise."""
    try:
        samples = client.query(query)
    except KmpOpsError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not samples:
        return None, "no data (the query returned no series)"
    if len(samples) > 1:
        return None, f"the query returned {len(samples)} series; it must return one"
    return samples[0].value, ""


def _read_prometheus(
    client: metrics.PrometheusClient, m: Measurement, values: Mapping[str, str]
) -> Reading:
    assert m.query is not None
    value, why = _single(client, render_query(m.query, values))
    requests = None
    if m.requests_query is not None:
        requests, why_requests = _single(client, render_query(m.requests_query, values))
        if requests is None:
            return Reading(None, None, f"requests: {why_requests}")
    if value is not None and math.isnan(value):
        return Reading(None, requests, "no data (NaN: no requests in the window)")
    return Reading(value, requests, why)


def _read_scrape(
    cfg: OpsConfig, svc: ServiceConfig, start: AnalysisStart, m: Measurement
) -> Reading:
    assert m.scrape is not None
    now = _scrape_hosts(cfg, svc, start.environment, start.hosts)
    counter = per = 0.0
    for host in start.hosts:
        before, after = start.baselines.get(host, "no baseline scrape"), now[host]
        if isinstance(before, str) or isinstance(after, str):
            why = before if isinstance(before, str) else after
            return Reading(None, None, f"{host}: {why}")
        counter += metrics.counter_delta(
            before, after, m.scrape.counter.metric, **m.scrape.counter.match
        )
        if m.scrape.per is not None:
            per += metrics.counter_delta(before, after, m.scrape.per.metric, **m.scrape.per.match)
    requests_sel = m.scrape.requests or m.scrape.per
    requests = None
    if requests_sel is not None:
        requests = 0.0
        for host in start.hosts:
            before, after = start.baselines[host], now[host]
            assert not isinstance(before, str) and not isinstance(after, str)
            requests += metrics.counter_delta(
                before, after, requests_sel.metric, **requests_sel.match
            )
    if m.scrape.per is None:
        return Reading(counter, requests)
    if per <= 0:
        return Reading(None, requests, "no data (no requests since the switch)")
    return Reading(counter / per, requests)


def _read_log(cfg: OpsConfig, svc: ServiceConfig, start: AnalysisStart, m: Measurement) -> Reading:
    assert m.log is not None
    offsets = start.log_offsets.get(m.name, {})
    pattern = shellsafe.quote(m.log.pattern)

    def one(env: str, host_name: str) -> int | None:
        path = shellsafe.quote(_log_path(svc, cfg, env, host_name, m))
        offset = int(offsets.get(host_name, 0))
        command = (
            f'f={path}; [ -f "$f" ] || {{ echo missing; exit 0; }}; off={offset}; '
            'size=$(stat -c %s "$f"); [ "$size" -ge "$off" ] || off=0; '
            f'tail -c +$((off + 1)) "$f" | grep -cE -e {pattern} || true'
        )
        with host_connection(_host(cfg, env, host_name)) as conn:
            out = conn.run(command, timeout=_LOG_TIMEOUT_S).stdout.strip()
        return int(out) if out.isdigit() else None

    outcomes = _on_hosts(one, [(start.environment, h) for h in start.hosts])
    total = 0
    for host, count in outcomes.items():
        if isinstance(count, Exception):
            return Reading(None, None, f"{host}: {type(count).__name__}: {count}")
        if count is None:
            return Reading(None, None, f"{host}: log {m.log.path} is missing")
        total += count
    return Reading(float(total), None, f"{total} new line(s) matching {m.log.pattern!r}")


def _reading(
    cfg: OpsConfig,
    svc: ServiceConfig,
    start: AnalysisStart,
    m: Measurement,
    client: metrics.PrometheusClient | None,
) -> Reading:
    if m.log is not None:
        return _read_log(cfg, svc, start, m)
    if client is not None and m.query is not None:
        values = {
            "instances": instances_regex(_instances(cfg, svc, start.environment, start.hosts)),
            "window": window_text(time.time() - start.started_at),
            "service": start.service,
            "environment": start.environment,
        }
        return _read_prometheus(client, m, values)
    if m.scrape is not None:
        return _read_scrape(cfg, svc, start, m)
    return Reading(None, None, "no Prometheus configured and no scrape for this measurement")


@task(
    name="run-analysis",
    cache_policy=NO_CACHE,
    task_run_name="analysis-{label}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def run_analysis(start: AnalysisStart, bake_s: float | None, label: str) -> AnalysisReport:
    """Take every measurement's readings (``count`` of them, ``interval`` apart — or spread over
    ``bake_s`` when given), stopping a measurement once it failed beyond its limit, and judge
    them. Audited as ``deploy.analysis``. Never raises for a bad reading: no data is an
    inconclusive reading. A service without measurements is inconclusive (not verified)."""
    cfg = ops_config()
    svc = cfg.service(start.service)
    client = _prometheus(cfg)
    logger = get_run_logger()
    schedule = sorted(
        (reading_interval(m.interval.total_seconds(), m.count, bake_s) * k, i, k)
        for i, m in enumerate(svc.analysis)
        for k in range(1, m.count + 1)
    )
    results: dict[int, list[ReadingResult]] = {i: [] for i in range(len(svc.analysis))}
    began = time.monotonic()
    for offset, i, _k in schedule:
        m = svc.analysis[i]
        if should_stop(results[i], failure_limit=m.failure_limit):
            continue
        time.sleep(max(0.0, began + offset - time.monotonic()))
        result = judge_reading(
            _reading(cfg, svc, start, m, client), success=m.success, min_requests=m.min_requests
        )
        logger.info("analysis %s %s: %s", label, m.name, result.reason)
        results[i].append(result)
    verdicts = [
        judge_measurement(m.name, results[i], count=m.count, failure_limit=m.failure_limit)
        for i, m in enumerate(svc.analysis)
    ]
    report = judge_analysis(f"{start.service} on {label}", verdicts)
    audit(
        "deploy.analysis",
        f"{start.service}/{start.environment}",
        label=label,
        hosts=list(start.hosts),
        outcome=report.outcome.value,
        source="prometheus" if client is not None else "scrape",
        verdicts=[
            {"name": v.name, "outcome": v.outcome.value, "reason": v.reason} for v in verdicts
        ],
        notes=list(start.notes),
    )
    return report


@task(
    name="staging-tests",
    cache_policy=NO_CACHE,
    task_run_name="staging-tests-{environment}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def run_staging_tests(service: str, environment: str, host_names: list[str]) -> list[str]:
    """Run the service's ``staging_tests``: the command (on each host, or once locally, with a
    timeout; exit 0 passes) and the traffic profile against each host (any answer outside
    ``expect_status`` fails). Every part runs even after a failure, so the analysis that follows
    has data. Raises PolicyViolation naming every failure; returns the evidence lines (none when
    the service has no staging tests)."""
    cfg = ops_config()
    svc = cfg.service(service)
    tests = svc.staging_tests
    if tests is None:
        return []
    evidence: list[str] = []
    failures: list[str] = []
    if tests.command is not None and tests.run_on == "local":
        values: dict[str, str | int] = {"environment": environment, "service": service}
        command = shellsafe.render_command(tests.command, values)
        try:
            proc = subprocess.run(  # noqa: S602 - configured code with quoted values
                command, shell=True, capture_output=True, text=True, timeout=tests.timeout
            )
            line = f"local: {tests.command}: exit {proc.returncode}"
            (failures if proc.returncode else evidence).append(
                line + (f": {proc.stdout.strip()[-200:]}{proc.stderr.strip()[-200:]}")
            )
        except subprocess.TimeoutExpired:
            failures.append(f"local: {tests.command}: timed out after {tests.timeout:g}s")

    def one(env: str, host_name: str) -> tuple[list[str], list[str]]:
        ok: list[str] = []
        bad: list[str] = []
        host = _host(cfg, env, host_name)
        if tests.command is not None and tests.run_on == "host":
            command = shellsafe.render_command(tests.command, _values(svc, host))
            with host_connection(host) as conn:
                res = conn.run(command, timeout=tests.timeout)
            line = f"{host_name}: {tests.command}: exit {res.exit_status}"
            (bad if res.exit_status else ok).append(line)
        if tests.traffic is not None:
            profile = tests.traffic
            result = send_traffic(
                svc.render(profile.url, host),
                requests=profile.requests,
                concurrency=profile.concurrency,
                timeout=profile.timeout,
            )
            unexpected = result.unexpected(profile.expect_status)
            line = f"{host_name}: {result.describe()}"
            if unexpected:
                shown = ", ".join(f"{c} x {n}" for c, n in sorted(unexpected.items()))
                bad.append(f"{line} — unexpected {shown} (expected {profile.expect_status})")
            else:
                ok.append(line)
        return ok, bad

    for host, outcome in _on_hosts(one, [(environment, h) for h in host_names]).items():
        if isinstance(outcome, Exception):
            failures.append(f"{host}: {type(outcome).__name__}: {outcome}")
        else:
            evidence += outcome[0]
            failures += outcome[1]
    audit(
        "deploy.staging_tests",
        f"{service}/{environment}",
        passed=not failures,
        evidence=evidence,
        failures=failures,
    )
    if failures:
        raise PolicyViolation("integration tests on staging failed: " + "; ".join(failures))
    return evidence


def analyse_recovery(
    service: str, host_names: list[str], bake_s: float | None = None
) -> list[tuple[str, AnalysisReport]]:
    """The service's analysis of ``host_names`` from now on (incident recovery: is the service
    healthy again?), per environment: (environment, report). Call it from a flow. Read-only."""
    cfg = ops_config()
    by_env: dict[str, list[str]] = {}
    for name in host_names:
        env, _ = cfg.host(name)
        by_env.setdefault(env, []).append(name)
    out = []
    for env, hosts in by_env.items():
        offsets = mark_log_offsets(service, env, hosts)
        start = begin_analysis(service, env, hosts, offsets)
        out.append((env, run_analysis(start, bake_s, f"recovery {env}")))
    return out
