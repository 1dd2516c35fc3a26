"""Deploy steps: one task per host for rolling back (each host's rollback visible on its own),
one task per batch or stage for the rest (staging a release that is not live yet, activating a
batch, reading current releases, checks: the hosts in parallel inside it, each host's outcome in
its result or error).

Tasks take names (service, environment, host, version) and build what they need from the config.
SSH connections are shared per host inside one process (``host_connection``) for the whole run:
one handshake per host, like Ansible's ControlPersist. A host that goes down drops its
connection, so its next step fails as unreachable; the flow closes every connection before the
rollback (fresh ones) and at the end (:func:`close_connections`). Caching is off on every task:
a deploy step must never be skipped because it "already ran".
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from kmpops import become, shellsafe
from kmpops import release as rel
from kmpops.config import HealthCheck, Host, OpsConfig, ServiceConfig
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import ConfigError, KmpOpsError, NotFound, PolicyViolation, TransientError
from kmpops.locks import service_target
from kmpops.plans.checklist import (
    ChecklistReport,
    EvidenceLimits,
    EvidenceUnreadable,
    default_checklist,
    evaluate_checklist,
    marked_bad_marks,
)
from kmpops.plans.failures import group_failures
from tasks.common import (
    STEP_TIMEOUT_S,
    actor,
    audit,
    ops_config,
    records,
    retry_on_transient,
    run_id,
    secret,
)
from tasks.locks import fence_for

__all__ = [
    "ResolvedArtifact",
    "activate_releases",
    "check_hosts",
    "close_connections",
    "marked_bad",
    "read_current_releases",
    "resolve_artifact",
    "roll_back_hosts",
    "rollback_host",
    "run_checklist",
    "stage_releases",
]

T = TypeVar("T")

_pool_lock = threading.Lock()
_pool: dict[str, tuple[SSHConnection, threading.Lock]] = {}


def _host(cfg: OpsConfig, environment: str, host_name: str) -> Host:
    for host in cfg.environment(environment).hosts:
        if host.name == host_name:
            return host
    raise NotFound(f"host {host_name!r} is not in environment {environment!r}")


@contextlib.contextmanager
def host_connection(host: Host) -> Any:
    """The shared connection to ``host`` (one user at a time)."""
    with _pool_lock:
        entry = _pool.get(host.name)
        if entry is None:
            entry = (SSHConnection.from_host(host, connect_timeout=5), threading.Lock())
            _pool[host.name] = entry
    conn, lock = entry
    with lock:
        yield conn


def close_connections() -> None:
    """Close every shared connection (between stages and at the end of a run)."""
    with _pool_lock:
        entries = list(_pool.values())
        _pool.clear()
    for conn, _ in entries:
        with contextlib.suppress(Exception):
            conn.close()


def _values(service: ServiceConfig, host: Host) -> dict[str, str | int]:
    return {**host.template_values(), "deploy_path": service.deploy_path_for(host)}


# -- artifact --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedArtifact:
    """A release artifact available as a local file, with its checksums."""

    path: str
    sha256: str
    expected_sha256: str | None
    source: str


def _sha256(path: Path) -> str:
    return rel.file_sha256(path)


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="resolve-artifact",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
)
def resolve_artifact(service: str, version: str, artifact: str | None) -> ResolvedArtifact:
    """Find the release artifact: an absolute local path, or the object
    ``releases/<service>/<version>.tar.gz`` (default) / ``artifact`` key in the object store,
    downloaded once into a local cache. The recorded checksum is the store's sha256 metadata
    (for a local file: ``<path>.sha256``). Raises NotFound if it is missing."""
    if artifact and artifact.startswith("/"):
        path = Path(shellsafe.validate_path(artifact, what="artifact path"))
        if not path.is_file():
            raise NotFound(f"artifact {artifact} does not exist")
        side = path.with_name(path.name + ".sha256")
        expected = side.read_text().split()[0].strip() if side.is_file() else None
        return ResolvedArtifact(str(path), _sha256(path), expected, f"file:{path}")
    key = artifact or f"releases/{service}/{version}.tar.gz"
    shellsafe.validate_path(key, what="artifact key")
    store = _store()
    info = store.head(key)
    if info is None:
        raise NotFound(f"artifact {key} is not in the object store")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "kmpops-artifacts" / digest
    cache.mkdir(parents=True, exist_ok=True)
    local = cache / Path(key).name
    # download() verifies the object against the sha256 recorded when it was stored.
    store.download(key, local)
    expected = info.sha256
    return ResolvedArtifact(str(local), _sha256(local), expected, f"s3:{key}")


def _store() -> Any:
    from kmpops.connectors.storage import open_store

    cfg = ops_config()
    if cfg.storage is None:
        raise NotFound("no storage configured in ops.yaml")
    return open_store(cfg.storage, secret)


# -- facts and checklist ---------------------------------------------------------------------


def _on_hosts(
    fn: Callable[[str, str], T], hosts: Sequence[tuple[str, str]], *, workers: int = 64
) -> dict[str, T | Exception]:
    """``fn(environment, host)`` for every host, ``workers`` at a time, on the shared
    connections, in the caller's (Prefect run) context; each host's value or the exception it
    raised. Many at once is cheaper than few here: 50 hosts' handshakes and uploads cost the
    daemons ~25 % less CPU with 50 threads than with 16 (bench/README.md)."""
    if not hosts:
        return {}
    size = min(workers, len(hosts))
    with ThreadPoolExecutor(max_workers=size, thread_name_prefix="host") as pool:
        # Each host runs in a copy of this context: the run's id and actor reach the audit.
        futures = {h: pool.submit(contextvars.copy_context().run, fn, env, h) for env, h in hosts}
    out: dict[str, T | Exception] = {}
    for host, fut in futures.items():
        exc = fut.exception()
        out[host] = fut.result() if exc is None else exc  # type: ignore[assignment]
    return out


def _raise_first(outcomes: Mapping[str, object]) -> None:
    """Raise the first failure among ``outcomes``, naming every failed host: transient errors
    stay transient (so the task's retry applies), anything else keeps its type."""
    failed = {h: o for h, o in outcomes.items() if isinstance(o, Exception)}
    if not failed:
        return
    text = group_failures({h: str(o) for h, o in failed.items()})
    first = next(iter(failed.values()))
    error: Exception = KmpOpsError(text)
    if isinstance(first, KmpOpsError) and not isinstance(first, ConfigError):
        with contextlib.suppress(Exception):
            error = type(first)(text)
    raise error from first


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="read-current-releases",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=0.5,
    retry_condition_fn=retry_on_transient,
)
def read_current_releases(service: str, hosts: list[tuple[str, str]]) -> dict[str, str | None]:
    """The release ``current`` points at on each ``(environment, host)`` (None: first install).

    Raises the first host's error (HostUnreachable, ...) naming every host that failed."""
    cfg = ops_config()
    svc = cfg.service(service)

    def one(environment: str, host_name: str) -> str | None:
        host = _host(cfg, environment, host_name)
        with host_connection(host) as conn:
            return rel.current_release(conn, svc.deploy_path_for(host))

    outcomes = _on_hosts(one, hosts)
    _raise_first(outcomes)
    return {h: v for h, v in outcomes.items() if not isinstance(v, Exception)}


@dataclass
class _Facts:
    service: str
    version: str
    artifact_sha256: str | None
    expected_sha256: str | None
    current_releases: dict[str, str | None]
    marked_bad: list[str]
    emergency: bool

    def run_command(self, command: str) -> tuple[int, str]:
        import subprocess

        proc = subprocess.run(  # noqa: S602 - checklist commands are configured code, not input
            command, shell=True, capture_output=True, text=True, timeout=300, check=False
        )
        return proc.returncode, proc.stdout + proc.stderr

    def http_status(self, url: str) -> int | None:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def evidence_record(self, key: str) -> Any:
        try:
            store = _store()
        except NotFound:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "evidence.json"
            try:
                store.download(key, local)
            except NotFound:
                return None
            try:
                return json.loads(local.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise EvidenceUnreadable(f"not JSON ({type(exc).__name__}: {exc})") from None


def marked_bad(service: str, version: str) -> list[str]:
    """Where and by which incident ``version`` of ``service`` was marked bad (audit trail's
    ``release.marked_bad`` events); empty when it never was."""
    events = records().audit_events(action="release.marked_bad")
    return marked_bad_marks(
        ((e.subject, e.details or {}) for e in events), service=service, version=version
    )


@task(name="pre-deployment-checklist", cache_policy=NO_CACHE, timeout_seconds=STEP_TIMEOUT_S)
def run_checklist(
    service: str,
    version: str,
    artifact: ResolvedArtifact,
    current_releases: dict[str, str | None],
    allow_first_install: bool,
    emergency: bool = False,
) -> ChecklistReport:
    """The guide's six gates with evidence, read against the service's ``evidence`` policy,
    and the release's status (marked bad by an incident: refused unless ``emergency``); every
    gate is evaluated and audited."""
    svc = ops_config().service(service)
    facts = _Facts(
        service,
        version,
        artifact.sha256,
        artifact.expected_sha256,
        current_releases,
        marked_bad(service, version),
        emergency,
    )
    limits = EvidenceLimits(
        min_tests=svc.evidence.min_tests,
        max_findings=dict(svc.evidence.max_findings),
        max_outdated=svc.evidence.max_outdated,
    )
    checks = default_checklist(allow_first_install=allow_first_install, limits=limits)
    report = evaluate_checklist(checks, facts)
    audit(
        "deploy.checklist",
        f"{service}@{version}",
        passed=report.passed,
        gates=report.table(),
        overrides=list(report.overrides),
    )
    return report


# -- release steps ---------------------------------------------------------------------------


_STAGE_ATTEMPTS = 3  # a host's staging is tried again on transient errors, 0.5 s apart


@task(
    name="stage-releases",
    cache_policy=NO_CACHE,
    task_run_name="stage-{environment}-{label}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def stage_releases(
    service: str,
    environment: str,
    host_names: list[str],
    version: str,
    artifact: ResolvedArtifact,
    label: str = "batch",
) -> dict[str, dict[str, str]]:
    """Upload and extract the release on every host of a batch, all at once (not live yet:
    staging changes nothing a host serves). Idempotent. A host's transient error (unreachable,
    timeout) is tried again twice. Never raises for one host: returns host -> ``{"status":
    "staged"}``, ``{"status": "present"}`` (already staged, same sha256) or ``{"error":
    "<type>: <message>"}``.
    """
    cfg = ops_config()
    svc = cfg.service(service)
    logger = get_run_logger()

    def one(env: str, host_name: str) -> dict[str, str]:
        host = _host(cfg, env, host_name)
        path, tarball = svc.deploy_path_for(host), Path(artifact.path)
        for attempt in range(1, _STAGE_ATTEMPTS + 1):
            try:
                with host_connection(host) as conn:
                    staged = rel.stage_release(conn, path, version, tarball, artifact.sha256)
                    become.check_sudo(conn, host, become.service_become_argvs(svc, host))
                return {"status": "staged" if staged else "present"}
            except TransientError as exc:
                if attempt == _STAGE_ATTEMPTS:
                    raise
                logger.warning("staging on %s failed (%s): trying again", host_name, exc)
                time.sleep(0.5)
        raise AssertionError("unreachable")

    outcomes = _on_hosts(one, [(environment, h) for h in host_names])
    return {
        h: {"error": f"{type(o).__name__}: {o}"} if isinstance(o, Exception) else o
        for h, o in outcomes.items()
    }


class HostDeployFailed(KmpOpsError):
    """A host did not become healthy on the new release (it has been switched)."""


def _check(
    svc: ServiceConfig, host: Host, conn: SSHConnection, check: HealthCheck
) -> rel.HealthResult:
    values = _values(svc, host)
    if check.url:
        return rel.check_health_url(
            svc.render(check.url, host),
            retries=check.retries,
            interval=check.interval,
            timeout=check.timeout,
        )
    assert check.command is not None
    return rel.check_health_command(
        conn,
        shellsafe.render_command(check.command, values),
        retries=check.retries,
        interval=check.interval,
        timeout=check.timeout,
    )


def _switch_and_check(
    svc: ServiceConfig, host: Host, conn: SSHConnection, version: str, *, prune: bool = False
) -> tuple[str | None, rel.HealthResult, list[str]]:
    """Switch to ``version`` and restart; then the health check, whose first probe (for a
    command check) rides in the same round trip; with ``prune``, once healthy, remove releases
    beyond ``keep_releases`` (never the new or the previous one; in the same round trip when
    the first probe passes). Returns (previous, health, pruned). Raises as ``rel.activate``."""
    path = svc.deploy_path_for(host)
    values = _values(svc, host)
    restart = become.service_command(svc, "restart", host, values)
    check = svc.health_check
    started = time.monotonic()
    if check.command is None:
        previous = rel.switch_current(conn, path, version, restart=restart)
        health = _check(svc, host, conn, check)
    else:
        done = rel.activate(
            conn,
            path,
            version,
            restart=restart,
            health=shellsafe.render_command(check.command, values),
            health_timeout=check.timeout,
            prune_keep=svc.keep_releases if prune else None,
        )
        assert done.probe is not None
        previous, (ok, detail) = done.previous, done.probe
        if ok or check.retries == 1:
            health = rel.HealthResult(ok, 1, detail, time.monotonic() - started)
            return previous, health, list(done.pruned)
        time.sleep(check.interval)
        rest = _check(svc, host, conn, check.model_copy(update={"retries": check.retries - 1}))
        health = rel.HealthResult(
            rest.healthy, rest.attempts + 1, rest.detail, time.monotonic() - started
        )
    pruned: list[str] = []
    if prune and health.healthy:
        pruned = rel.prune_releases(conn, path, keep=svc.keep_releases, protect=[previous])
    return previous, health, pruned


def _activate(
    cfg: OpsConfig, service: str, environment: str, host_name: str, version: str, sha256: str
) -> tuple[str | None, list[str]]:
    """One host of :func:`activate_releases`; returns its previous release and what was
    pruned."""
    host = _host(cfg, environment, host_name)
    svc = cfg.service(service)
    subject = f"{service}/{environment}/{host_name}"
    with host_connection(host) as conn:
        try:
            previous, health, pruned = _switch_and_check(svc, host, conn, version, prune=True)
        except rel.RestartFailed as exc:
            audit("deploy.switch", subject, version=version, previous=exc.previous)
            raise HostDeployFailed(f"{host_name}: {exc}") from None
    audit("deploy.switch", subject, version=version, previous=previous)
    if not health.healthy:
        raise HostDeployFailed(
            f"{host_name}: health check failed after {health.attempts} attempts ({health.detail})"
        )
    records().record_release(
        service=service,
        environment=environment,
        host=host_name,
        version=version,
        sha256=sha256,
        deployed_by=actor(),
        run_id=run_id(),
        fence=fence_for(service_target(service, environment)),
    )
    return previous, pruned


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="activate-releases",
    cache_policy=NO_CACHE,
    task_run_name="activate-{environment}-{label}",
)
def activate_releases(
    service: str,
    environment: str,
    host_names: list[str],
    version: str,
    sha256: str,
    label: str = "batch",
) -> dict[str, dict[str, Any]]:
    """On every host of a batch at once: switch ``current`` to the staged release, restart,
    health check, record it as current (each host audited as ``deploy.switch``), then remove
    releases beyond ``keep_releases`` (never the new or the previous one, so a rollback always
    has its target).

    Never raises for one host: returns host -> ``{"previous": <release or None>, "pruned":
    [...]}``, or ``{"error": "<type>: <message>"}`` — HostDeployFailed when the restart or
    health check failed (the host is switched and needs the rollback), a connection error
    when the host may or may not have been switched (the rollback reads the host to find out).
    """
    cfg = ops_config()
    logger = get_run_logger()

    def one(env: str, host_name: str) -> dict[str, Any]:
        previous, pruned = _activate(cfg, service, env, host_name, version, sha256)
        logger.info("%s: %s -> %s, healthy", host_name, previous or "(first install)", version)
        return {"previous": previous, "pruned": pruned}

    out: dict[str, dict[str, Any]] = {}
    for h, o in _on_hosts(one, [(environment, h) for h in host_names]).items():
        if isinstance(o, Exception):
            logger.warning("%s: %s: %s", h, type(o).__name__, o)
            out[h] = {"error": f"{type(o).__name__}: {o}"}
        else:
            out[h] = o
    return out


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="rollback-host",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=0.5,
    retry_condition_fn=retry_on_transient,
    task_run_name="rollback-{host_name}",
)
def rollback_host(
    service: str, environment: str, host_name: str, to_version: str | None, from_version: str
) -> str:
    """Put the host back on ``to_version`` (None: remove ``current`` of a first install):
    switch, restart, health check, record. Idempotent. Raises on failure (the flow marks the
    host and notifies); returns a one-line description."""
    cfg = ops_config()
    host = _host(cfg, environment, host_name)
    svc = cfg.service(service)
    path = svc.deploy_path_for(host)
    subject = f"{service}/{environment}/{host_name}"
    with host_connection(host) as conn:
        now = rel.current_release(conn, path)
        health = None
        if now == to_version:
            if now is not None:
                rel.restart_service(
                    conn, become.service_command(svc, "restart", host, _values(svc, host))
                )
                health = _check(svc, host, conn, svc.health_check)
        elif to_version is None:
            rel.remove_current(conn, path)
        else:
            _, health, _ = _switch_and_check(svc, host, conn, to_version)
        if health is not None and not health.healthy:
            raise HostDeployFailed(f"{host_name}: unhealthy after rollback ({health.detail})")
    if to_version is not None:
        records().record_release(
            service=service,
            environment=environment,
            host=host_name,
            version=to_version,
            deployed_by=actor(),
            run_id=run_id(),
            fence=fence_for(service_target(service, environment)),
        )
    audit("deploy.rollback", subject, to=to_version, rolled_back=from_version)
    return f"{host_name}: {from_version} -> {to_version or '(removed: first install)'}"


def roll_back_hosts(
    service: str,
    version: str,
    hosts: Mapping[tuple[str, str], str | None],
    *,
    flag_run_id: str | None,
) -> tuple[list[str], list[str]]:
    """Roll ``hosts`` ((environment, host) -> the release to go back to) back in parallel with
    ``rollback_host`` tasks on fresh connections; call it from inside a flow. A host whose
    rollback fails is audited (``deploy.rollback_failed``) and its ``version`` release flagged
    ``rollback_failed`` under ``flag_run_id``. Returns (what was put back, ``host: error`` of
    each failure); never raises for a host."""
    close_connections()
    futures = {
        key: rollback_host.submit(service, key[0], key[1], previous, version)
        for key, previous in hosts.items()
    }
    done, failed = [], []
    for (env, host), fut in futures.items():
        fut.wait()
        if fut.state.is_completed():
            done.append(fut.result())
            continue
        why = f"ended {fut.state.name}"
        try:
            fut.result()
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        failed.append(f"{host}: {why}")
        audit("deploy.rollback_failed", f"{service}/{env}/{host}", error=why, version=version)
        records().flag_release(
            service=service,
            environment=env,
            host=host,
            version=version,
            state="rollback_failed",
            run_id=flag_run_id,
        )
    close_connections()
    return done, failed


@task(
    name="check-hosts",
    cache_policy=NO_CACHE,
    task_run_name="{kind}-checks-{environment}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def check_hosts(service: str, environment: str, host_names: list[str], kind: str) -> list[str]:
    """Run the service's ``integration_tests`` or ``smoke_checks`` (default: its health check)
    against every host in parallel.

    Raises PolicyViolation naming every failing host and check; returns the evidence lines."""
    cfg = ops_config()
    svc = cfg.service(service)
    checks = (svc.integration_tests if kind == "integration" else svc.smoke_checks) or [
        svc.health_check
    ]

    def one(env: str, host_name: str) -> list[str]:
        host = _host(cfg, env, host_name)
        evidence = []
        with host_connection(host) as conn:
            for check in checks:
                result = _check(svc, host, conn, check)
                what = (check.url and svc.render(check.url, host)) or check.command
                if not result.healthy:
                    raise PolicyViolation(f"{kind} check {what} failed: {result.detail}")
                evidence.append(f"{host_name}: {what}: {result.detail}")
        return evidence

    outcomes = _on_hosts(one, [(environment, h) for h in host_names])
    failed = {h: str(o) for h, o in outcomes.items() if isinstance(o, Exception)}
    if failed:
        raise PolicyViolation(group_failures(failed))
    return [line for o in outcomes.values() if isinstance(o, list) for line in o]


# -- crash recovery --------------------------------------------------------------------------

RECOVER_TRIGGER: dict[str, Any] = {
    "expect": ["prefect.flow-run.Crashed"],
    "match": {"prefect.resource.id": "prefect.flow-run.*"},
    "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": "deploy-pipeline"},
    "parameters": {"flow_run_id": "{{ event.resource.id }}"},
}
"""What ``DeploymentEventTrigger(**RECOVER_TRIGGER)`` on deploy-recover needs: a deploy-pipeline
run that crashed (its runner saw the process die, or a zombie automation marked it)."""


def recover_trigger() -> Any:
    """The ``DeploymentEventTrigger`` that starts deploy-recover for a crashed deploy run."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(name="kmpops-deploy-crashed", **RECOVER_TRIGGER)


@task(
    name="read-flow-run",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    timeout_seconds=STEP_TIMEOUT_S,
)
def read_flow_run(flow_run_id: str) -> dict[str, Any]:
    """The run's flow name, run name, state name and whether it is final, from the Prefect
    API. Raises NotFound."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            raise NotFound(f"no flow run {flow_run_id}") from None
        flow = client.read_flow(run.flow_id)
    state = run.state
    return {
        "flow": flow.name,
        "name": run.name,
        "state_name": state.name if state else None,
        "final": bool(state and state.is_final()),
    }


@task(name="mark-run-crashed", cache_policy=NO_CACHE, timeout_seconds=STEP_TIMEOUT_S)
def mark_run_crashed(flow_run_id: str, why: str) -> None:
    """Force the run into Crashed (an operator said its process is gone) and audit it."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message=why), force=True)
    audit("deploy.marked_crashed", f"flow-run/{flow_run_id}", reason=why)
