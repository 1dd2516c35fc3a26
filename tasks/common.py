"""What every task shares: the config, the records store, the audit trail, retries, notifications.

Nothing here runs at import. The config path comes from ``KMPOPS_CONFIG`` (default ``ops.yaml``);
the config and the records store are built once per process and reused. The redacting log filter
is installed the first time any of these is used, i.e. inside every flow run that touches them.
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

_lock = threading.Lock()
_cache: dict[str, Any] = {}


def config_path() -> Path:
    """The ops.yaml in use (``KMPOPS_CONFIG``, default ``./ops.yaml``)."""
    return Path(os.environ.get("KMPOPS_CONFIG", "ops.yaml")).resolve()


def ops_config() -> OpsConfig:
    """The validated config, loaded once per process (reloaded if the file changed)."""
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
    """The records store of the current config, migrated to the newest schema once."""
    cfg = ops_config()
    with _lock:
        rec = _cache.get("records")
        if rec is None:
            rec = Records.from_config(cfg, block_loader=_load_prefect_secret)
            rec.migrate()
            _cache["records"] = rec
        return rec


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


@task(name="audit-event", cache_policy=NO_CACHE)
def audit_event(action: str, subject: str, details: dict[str, Any] | None = None) -> None:
    """A task that appends one event to the audit chain, visible as a step in the UI."""
    audit(action, subject, **(details or {}))


@task(name="notify", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def notify(severity: str, title: str, body: str, dedup_key: str | None = None) -> int:
    """Send a notification on the severity's routes; returns how many deliveries succeeded."""
    deliveries = notifier().send(severity=severity, title=title, body=body, dedup_key=dedup_key)
    failed = [d for d in deliveries if not d.ok]
    if failed:
        get_run_logger().warning("notification failed on %d route(s)", len(failed))
    return len(deliveries) - len(failed)
