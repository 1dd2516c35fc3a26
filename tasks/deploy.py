"""Deploy steps: one task per host for rolling back (each host's rollback visible on its own),
one task per batch or stage for the rest (staging a release that is not live yet, activating a
batch, reading current releases, checks: the hosts in parallel inside it, each host's outcome a
:class:`~kmpops.outcomes.HostOutcome`).

Tasks take resolved models (the service as :class:`~kmpops.context.ResolvedService`, the hosts
as ``kmpops.config.Host``) and work through the run's context (``tasks.context.run_context()``):
its frozen config, its one ``Fleet`` — one connection per host for the whole run, one handshake
per host, like Ansible's ControlPersist, owned by this run alone — and its one object store. A
host that goes down drops its connection, so its next step fails as unreachable; the rollback
starts on fresh connections (:func:`roll_back_hosts` closes the run's fleet first); the context
closes everything when the run ends. Caching is off on every task: a deploy step must never be
skipped because it "already ran".
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from kmpops.context import ResolvedService
from kmpops.errors import ConfigError, KmpOpsError, NotFound, PolicyViolation, TransientError
from kmpops.locks import service_target
from kmpops.outcomes import HostOutcome
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
    records,
    retry_on_transient,
    run_id,
)
from tasks.context import run_context
from tasks.locks import fence_for

__all__ = [
    "Activation",
    "ResolvedArtifact",
    "activate_releases",
    "check_hosts",
    "host_connection",
    "marked_bad",
    "read_current_releases",
    "resolve_artifact",
    "roll_back_hosts",
    "rollback_host",
    "run_checklist",
    "stage_releases",
]

T = TypeVar("T")


def _host(cfg: OpsConfig, environment: str, host_name: str) -> Host:
    """The host ``host_name`` of ``environment`` in the run's config (its context's index, not
    a scan); NotFound otherwise."""
    return run_context().host(host_name, environment)


@contextlib.contextmanager
def host_connection(host: Host) -> Iterator[SSHConnection]:
    """The run's connection to ``host`` (its context's fleet), held for the block: one user at
    a time per host."""
    with run_context().fleet.using(host.name) as conn:
        yield conn


def _values(service: ServiceConfig | ResolvedService, host: Host) -> dict[str, str | int]:
    return {**host.template_values(), "deploy_path": service.deploy_path_for(host)}


def _model(service: ServiceConfig | ResolvedService) -> ServiceConfig:
    return service.config if isinstance(service, ResolvedService) else service


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
    store = run_context().store
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


# -- facts and checklist ---------------------------------------------------------------------


def _on_hosts(
    fn: Callable[[str, str], T], hosts: Sequence[tuple[str, str]], *, workers: int = 64
) -> dict[str, T | Exception]:
    """``fn(environment, host)`` for every host, ``workers`` at a time, in the caller's
    (Prefect run) context; each host's value or the exception it raised. A plain thread fan-out
    for steps that are not one connection's work (``fn`` takes the host's connection itself,
    with :func:`host_connection`)."""
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


def _on_fleet(
    fn: Callable[[Host, SSHConnection], T], hosts: Sequence[Host]
) -> dict[str, HostOutcome[T]]:
    """``fn(host, connection)`` for every host at once on the run's fleet (one user at a time
    per host); each host's :class:`HostOutcome`, in the order given."""
    return run_context().fleet.run_on(fn, hosts=[h.name for h in hosts])


def _raise_first(outcomes: Mapping[str, HostOutcome[Any]]) -> None:
    """Raise the first failure among ``outcomes``, naming every failed host: transient errors
    stay transient (so the task's retry applies), anything else keeps its type."""
    failed = {h: o.error for h, o in outcomes.items() if not o.ok and o.error is not None}
    if not failed:
        return
    text = group_failures({h: str(e) for h, e in failed.items()})
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
def read_current_releases(service: ResolvedService, hosts: list[Host]) -> dict[str, str | None]:
    """The release ``current`` points at on each host (None: first install), on the run's
    connections (the ones the rollout goes on with).

    Raises the first host's error (HostUnreachable, ...) naming every host that failed."""

    def one(host: Host, conn: SSHConnection) -> str | None:
        return rel.current_release(conn, service.deploy_path_for(host))

    outcomes = _on_fleet(one, hosts)
    _raise_first(outcomes)
    return {h: o.value for h, o in outcomes.items()}


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
            store = run_context().store
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
    service: ResolvedService,
    version: str,
    artifact: ResolvedArtifact,
    current_releases: dict[str, str | None],
    allow_first_install: bool,
    emergency: bool = False,
) -> ChecklistReport:
    """The guide's six gates with evidence, read against the service's ``evidence`` policy,
    and the release's status (marked bad by an incident: refused unless ``emergency``); every
    gate is evaluated and audited."""
    svc = service.config
    facts = _Facts(
        service.name,
        version,
        artifact.sha256,
        artifact.expected_sha256,
        current_releases,
        marked_bad(service.name, version),
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
        f"{service.name}@{version}",
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
    service: ResolvedService,
    environment: str,
    hosts: list[Host],
    version: str,
    artifact: ResolvedArtifact,
    label: str = "batch",
) -> dict[str, HostOutcome[str]]:
    """Upload and extract the release on every host of a batch, all at once (not live yet:
    staging changes nothing a host serves). Idempotent. A host's transient error (unreachable,
    timeout) is tried again twice. Never raises for one host: returns host -> its outcome,
    whose value is ``"staged"`` or ``"present"`` (already staged, same sha256).
    """
    logger = get_run_logger()
    tarball = Path(artifact.path)

    def one(host: Host, conn: SSHConnection) -> str:
        path = service.deploy_path_for(host)
        for attempt in range(1, _STAGE_ATTEMPTS + 1):
            try:
                staged = rel.stage_release(conn, path, version, tarball, artifact.sha256)
                become.check_sudo(conn, host, become.service_become_argvs(service.config, host))
                return "staged" if staged else "present"
            except TransientError as exc:
                if attempt == _STAGE_ATTEMPTS:
                    raise
                logger.warning("staging on %s failed (%s): trying again", host.name, exc)
                time.sleep(0.5)
        raise AssertionError("unreachable")

    return _on_fleet(one, hosts)


class HostDeployFailed(KmpOpsError):
    """A host did not become healthy on the new release (it has been switched)."""


def _check(
    svc: ServiceConfig | ResolvedService, host: Host, conn: SSHConnection, check: HealthCheck
) -> rel.HealthResult:
    values = _values(svc, host)
    if check.url:
        return rel.check_health_url(
            _model(svc).render(check.url, host),
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
    service: ServiceConfig | ResolvedService,
    host: Host,
    conn: SSHConnection,
    version: str,
    *,
    prune: bool = False,
) -> tuple[str | None, rel.HealthResult, list[str]]:
    """Switch to ``version`` and restart; then the health check, whose first probe (for a
    command check) rides in the same round trip; with ``prune``, once healthy, remove releases
    beyond ``keep_releases`` (never the new or the previous one; in the same round trip when
    the first probe passes). Returns (previous, health, pruned). Raises as ``rel.activate``."""
    svc = _model(service)
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


@dataclass(frozen=True)
class Activation:
    """A host switched to the new release and healthy: what it had before, what was pruned."""

    previous: str | None
    pruned: list[str]


def _activate(
    service: ResolvedService,
    environment: str,
    host: Host,
    conn: SSHConnection,
    version: str,
    sha256: str,
) -> Activation:
    """One host of :func:`activate_releases`."""
    subject = f"{service.name}/{environment}/{host.name}"
    try:
        previous, health, pruned = _switch_and_check(service, host, conn, version, prune=True)
    except rel.RestartFailed as exc:
        audit("deploy.switch", subject, version=version, previous=exc.previous)
        raise HostDeployFailed(f"{host.name}: {exc}") from None
    audit("deploy.switch", subject, version=version, previous=previous)
    if not health.healthy:
        raise HostDeployFailed(
            f"{host.name}: health check failed after {health.attempts} attempts ({health.detail})"
        )
    records().record_release(
        service=service.name,
        environment=environment,
        host=host.name,
        version=version,
        sha256=sha256,
        deployed_by=actor(),
        run_id=run_id(),
        fence=fence_for(service_target(service.name, environment)),
    )
    return Activation(previous, pruned)


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="activate-releases",
    cache_policy=NO_CACHE,
    task_run_name="activate-{environment}-{label}",
)
def activate_releases(
    service: ResolvedService,
    environment: str,
    hosts: list[Host],
    version: str,
    sha256: str,
    label: str = "batch",
) -> dict[str, HostOutcome[Activation]]:
    """On every host of a batch at once: switch ``current`` to the staged release, restart,
    health check, record it as current (each host audited as ``deploy.switch``), then remove
    releases beyond ``keep_releases`` (never the new or the previous one, so a rollback always
    has its target).

    Never raises for one host: returns host -> its outcome, an :class:`Activation` or the
    error — HostDeployFailed when the restart or health check failed (the host is switched and
    needs the rollback), a connection error when the host may or may not have been switched
    (the rollback reads the host to find out).
    """
    logger = get_run_logger()

    def one(host: Host, conn: SSHConnection) -> Activation:
        done = _activate(service, environment, host, conn, version, sha256)
        logger.info("%s: %s -> %s, healthy", host.name, done.previous or "(first install)", version)
        return done

    outcomes = _on_fleet(one, hosts)
    for h, o in outcomes.items():
        if not o.ok:
            logger.warning("%s: %s", h, o.failure)
    return outcomes


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="rollback-host",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=0.5,
    retry_condition_fn=retry_on_transient,
    task_run_name="rollback-{host.name}",
)
def rollback_host(
    service: ResolvedService,
    environment: str,
    host: Host,
    to_version: str | None,
    from_version: str,
) -> str:
    """Put the host back on ``to_version`` (None: remove ``current`` of a first install):
    switch, restart, health check, record. Idempotent. Raises on failure (the flow marks the
    host and notifies); returns a one-line description."""
    svc = service.config
    path = svc.deploy_path_for(host)
    subject = f"{service.name}/{environment}/{host.name}"
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
            raise HostDeployFailed(f"{host.name}: unhealthy after rollback ({health.detail})")
    if to_version is not None:
        records().record_release(
            service=service.name,
            environment=environment,
            host=host.name,
            version=to_version,
            deployed_by=actor(),
            run_id=run_id(),
            fence=fence_for(service_target(service.name, environment)),
        )
    audit("deploy.rollback", subject, to=to_version, rolled_back=from_version)
    return f"{host.name}: {from_version} -> {to_version or '(removed: first install)'}"


def roll_back_hosts(
    service: str,
    version: str,
    hosts: Mapping[tuple[str, str], str | None],
    *,
    flag_run_id: str | None,
) -> tuple[list[str], list[str]]:
    """Roll ``hosts`` ((environment, host) -> the release to go back to) back in parallel with
    ``rollback_host`` tasks on fresh connections (the run's fleet is closed first: a host that
    went down mid-step starts over); call it from inside a flow that opened its run context. A
    host whose rollback fails (or is no longer in the config) is audited
    (``deploy.rollback_failed``) and its ``version`` release flagged ``rollback_failed`` under
    ``flag_run_id``. Returns (what was put back, ``host: error`` of each failure); never raises
    for a host."""
    ctx = run_context()
    ctx.fleet.close()
    resolved = ctx.service(service)
    futures: dict[tuple[str, str], Any] = {}
    failed: list[str] = []
    unknown: dict[tuple[str, str], str] = {}
    for key, previous in hosts.items():
        try:
            host = ctx.host(key[1], key[0])
        except NotFound as exc:
            unknown[key] = f"{type(exc).__name__}: {exc}"
            continue
        futures[key] = rollback_host.submit(resolved, key[0], host, previous, version)
    done = []
    whys: dict[tuple[str, str], str] = dict(unknown)
    for key, fut in futures.items():
        fut.wait()
        if fut.state.is_completed():
            done.append(fut.result())
            continue
        why = f"ended {fut.state.name}"
        try:
            fut.result()
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        whys[key] = why
    for (env, host_name), why in whys.items():
        failed.append(f"{host_name}: {why}")
        audit("deploy.rollback_failed", f"{service}/{env}/{host_name}", error=why, version=version)
        records().flag_release(
            service=service,
            environment=env,
            host=host_name,
            version=version,
            state="rollback_failed",
            run_id=flag_run_id,
        )
    return done, failed


@task(
    name="check-hosts",
    cache_policy=NO_CACHE,
    task_run_name="{kind}-checks-{environment}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def check_hosts(
    service: ResolvedService, environment: str, hosts: list[Host], kind: str
) -> list[str]:
    """Run the service's ``integration_tests`` or ``smoke_checks`` (default: its health check)
    against every host in parallel.

    Raises PolicyViolation naming every failing host and check; returns the evidence lines."""
    svc = service.config
    checks = (svc.integration_tests if kind == "integration" else svc.smoke_checks) or [
        svc.health_check
    ]

    def one(host: Host, conn: SSHConnection) -> list[str]:
        evidence = []
        for check in checks:
            result = _check(svc, host, conn, check)
            what = (check.url and svc.render(check.url, host)) or check.command
            if not result.healthy:
                raise PolicyViolation(f"{kind} check {what} failed: {result.detail}")
            evidence.append(f"{host.name}: {what}: {result.detail}")
        return evidence

    outcomes = _on_fleet(one, hosts)
    failed = {h: str(o.error) for h, o in outcomes.items() if not o.ok}
    if failed:
        raise PolicyViolation(group_failures(failed))
    return [line for o in outcomes.values() if o.ok and o.value for line in o.value]


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


CR_RECOVER_TRIGGER: dict[str, Any] = {
    "expect": ["prefect.flow-run.Crashed"],
    "match": {"prefect.resource.id": "prefect.flow-run.*"},
    "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": "change-request"},
    "parameters": {},
}
"""What ``DeploymentEventTrigger(**CR_RECOVER_TRIGGER)`` on change-request-recover needs: a
change-request run that crashed; the recovery sweeps every open change whose run has ended."""


def change_request_recover_trigger() -> Any:
    """The ``DeploymentEventTrigger`` that starts change-request-recover for a crashed
    change-request run."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(name="kmpops-change-request-crashed", **CR_RECOVER_TRIGGER)


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
