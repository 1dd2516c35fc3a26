"""What every task shares: the config, the records store, the audit trail, retries, notifications.

Nothing here runs at import. The config path comes from ``KMPOPS_CONFIG`` (default ``ops.yaml``);
the config and the records store are built once per process and reused. The redacting log filter
is installed the first time any of these is used, i.e. inside every flow run that touches them.

The config is frozen for a run: the first ``ops_config()`` inside a flow run (or its tasks) pins
the validated config and its sha256 (:func:`config_digest`) to that run id, and every later call
in the same run gets the same object even if ops.yaml changes on disk meanwhile. A procedure that
waited (an approval) calls :func:`ensure_config_unchanged` before it applies: a config edited
since the plan was made is refused, never silently used (re-plan, re-approve).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import State

from kmpops.config import OpsConfig, SecretRef, load_config
from kmpops.connectors.notify import Notifier
from kmpops.errors import TransientError
from kmpops.records import Records
from kmpops.secrets import resolve_secret

# Every task has a bound, so no flow hangs forever (issue 10). The connectors' own bounds (SSH
# commands and SFTP, database locks and statements, HTTP) are what stop blocking I/O and fire
# first; this is the backstop (tests/unit/test_task_bounds.py fails on a task without one).
STEP_TIMEOUT_S = 2 * 3600.0

_lock = threading.Lock()
_cache: dict[str, Any] = {}
#: run id -> (config, digest) frozen at the run's first ops_config(); bounded, oldest dropped
_frozen: dict[str, tuple[OpsConfig, str, str]] = {}  # (config, digest, sha256 of the file)
_FROZEN_MAX = 256


def config_path() -> Path:
    """The ops.yaml in use (``KMPOPS_CONFIG``, default ``./ops.yaml``)."""
    return Path(os.environ.get("KMPOPS_CONFIG", "ops.yaml")).resolve()


def ops_config() -> OpsConfig:
    """The validated config. Inside a flow run: the config frozen for that run (its run
    context's, see ``tasks.context``; else the module docstring's); outside one: a test's
    ``config_override``, or ops.yaml loaded once per process, reloaded if the file changed."""
    from tasks.context import current_context, overriding_config

    ctx = current_context()
    if ctx is not None:
        return ctx.config
    given = overriding_config()
    if given is not None:
        return given
    current = run_id()
    if current is not None:
        with _lock:
            frozen = _frozen.get(current)
        if frozen is not None:
            return frozen[0]
        raw = _file_sha256(config_path())  # read before the load: a change in between shows
        cfg = _load_current_config()
        with _lock:
            frozen = _frozen.setdefault(current, (cfg, digest_of_config(cfg), raw))
            while len(_frozen) > _FROZEN_MAX:
                _frozen.pop(next(iter(_frozen)))
        return frozen[0]
    return _load_current_config()


def digest_of_config(cfg: OpsConfig) -> str:
    """sha256 of a validated config (secret values masked, so never part of it)."""
    from kmpops.context import digest_of_config as _digest

    return _digest(cfg)


def frozen_snapshot() -> Any:
    """The ``kmpops.context.ConfigSnapshot`` the current run froze before it opened its run
    context (None if it did not read its config yet)."""
    from kmpops.context import ConfigSnapshot

    current = run_id()
    with _lock:
        frozen = _frozen.get(current) if current is not None else None
    if frozen is None:
        return None
    return ConfigSnapshot(frozen[0], frozen[1], config_path(), frozen[2])


def config_digest() -> str:
    """The sha256 of the config this run uses (its run context's, or frozen at its first
    ops_config())."""
    from tasks.context import current_context

    ctx = current_context()
    if ctx is not None:
        return ctx.digest
    cfg = ops_config()
    current = run_id()
    with _lock:
        frozen = _frozen.get(current) if current is not None else None
    return frozen[1] if frozen is not None else digest_of_config(cfg)


def ensure_config_unchanged(what: str) -> str:
    """Raise PolicyViolation if ops.yaml on disk no longer is the config this run was planned
    on (its digest changed, or it no longer loads); returns the digest otherwise.

    Called between an approval and the change it approved: the approvers saw the plan of the
    frozen config, so a changed file means re-plan and re-approve (start a new run)."""
    from kmpops.errors import KmpOpsError, PolicyViolation
    from tasks.context import current_context

    ctx = current_context()
    if ctx is not None:
        return ctx.ensure_config_unchanged(what)
    planned = config_digest()
    current = run_id()
    with _lock:
        frozen = _frozen.get(current) if current is not None else None
    if frozen is not None and frozen[2] and _file_sha256(config_path()) == frozen[2]:
        return planned  # the very bytes it was loaded from: no need to parse it again
    try:
        now = digest_of_config(load_config(config_path()))
    except (KmpOpsError, OSError, ValueError) as exc:
        raise PolicyViolation(
            f"{what}: the config no longer loads ({exc}); re-plan and re-approve in a new run"
        ) from None
    if now != planned:
        raise PolicyViolation(
            f"{what}: the config changed since the plan was approved (config digest "
            f"{planned[:12]} -> {now[:12]}); re-plan and re-approve in a new run"
        )
    return planned


def _file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, "" if it cannot be read."""
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _load_current_config() -> OpsConfig:
    path = config_path()
    stamp = (str(path), path.stat().st_mtime_ns if path.exists() else 0)
    with _lock:
        if _cache.get("config_stamp") != stamp:
            _cache["config"] = load_config(path)
            _cache["config_stamp"] = stamp
            _cache.pop("records", None)
            _cache.pop("notifier", None)
            install_redaction(_cache["config"])
        return _cache["config"]


def records() -> Records:
    """The records store of the current config (the run context's inside a run that opened
    one), migrated to the newest schema once."""
    from tasks.context import current_context, overriding_config, records_for

    ctx = current_context()
    if ctx is not None:
        return ctx.records  # type: ignore[no-any-return]
    given = overriding_config()
    if given is not None:
        return records_for(given)
    return records_for(ops_config())


def notifier() -> Notifier:
    """The notifier built from the config's routes."""
    cfg = ops_config()
    with _lock:
        note = _cache.get("notifier")
        if note is None:
            note = Notifier(cfg.notifications.routes)
            _cache["notifier"] = note
        return note


def _load_prefect_secret(name: str) -> str:
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


def secret(ref: SecretRef | str) -> str:
    """Resolve a secret reference inside a task (registered with the redactor, never logged)."""
    install_redaction()
    return resolve_secret(ref, block_loader=_load_prefect_secret)


def install_redaction(cfg: OpsConfig | None = None) -> None:
    """Install the redacting log filter and teach it the config's resolvable secret values."""
    from kmpops import redact

    redact.install()
    if cfg is None:
        return
    for ref in cfg.secret_values():
        if ref.scheme in ("literal", "env", "file"):
            # an unresolvable secret is reported where it is used, not here
            with contextlib.suppress(Exception):
                resolve_secret(ref)


def run_id() -> str | None:
    """The id of the current flow run, if any."""
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id)
    tctx = TaskRunContext.get()
    if tctx is not None and tctx.task_run.flow_run_id is not None:
        return str(tctx.task_run.flow_run_id)
    return None


def run_service_identity() -> str | None:
    """The service identity the current run acts as, from Prefect's provenance: a run the
    scheduler created is ``service:scheduler``, one an automation (event trigger) created is
    ``service:automation``; a subflow acts as its parent run does; None for a run a person
    started (they authenticate themselves)."""
    from prefect.client.orchestration import get_client

    from kmpops.plans.approval import service_identity

    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx is not None else None
    with get_client(sync_client=True) as client:
        for _ in range(8):  # a subflow chain deeper than this acts as a person would
            if flow_run is None:
                return None
            if flow_run.auto_scheduled:
                return service_identity("scheduler")
            created = flow_run.created_by
            if created is not None and str(created.type).upper() == "AUTOMATION":
                return service_identity("automation")
            if flow_run.parent_task_run_id is None:
                return None
            parent = client.read_task_run(flow_run.parent_task_run_id).flow_run_id
            flow_run = client.read_flow_run(parent) if parent else None
    return None


def actor() -> str:
    """Who acts: ``KMPOPS_ACTOR``, else the flow run's name, else ``kmp-ops``."""
    explicit = os.environ.get("KMPOPS_ACTOR")
    if explicit:
        return explicit
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return f"flow-run/{ctx.flow_run.name}"
    return "kmp-ops"


def audit(action: str, subject: str, **details: Any) -> None:
    """Append an event to the audit chain (secrets redacted) from inside a flow or task."""
    records().audit(actor=actor(), action=action, subject=subject, details=details, run_id=run_id())


def retry_on_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is a TransientError."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


@task(name="audit-event", cache_policy=NO_CACHE, timeout_seconds=STEP_TIMEOUT_S)
def audit_event(action: str, subject: str, details: dict[str, Any] | None = None) -> None:
    """A task that appends one event to the audit chain, visible as a step in the UI."""
    audit(action, subject, **(details or {}))


@task(
    name="notify",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    timeout_seconds=STEP_TIMEOUT_S,
)
def notify(severity: str, title: str, body: str, dedup_key: str | None = None) -> int:
    """Send a notification on the severity's routes; returns how many deliveries succeeded."""
    deliveries = notifier().send(severity=severity, title=title, body=body, dedup_key=dedup_key)
    failed = [d for d in deliveries if not d.ok]
    if failed:
        get_run_logger().warning("notification failed on %d route(s)", len(failed))
    return len(deliveries) - len(failed)
