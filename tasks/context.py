"""The run context, the Prefect side: each flow run opens its own :class:`kmpops.context.RunContext`
once, registered under its flow run id while it runs, closed when it ends.

A flow opts in with :func:`in_run_context` (between ``@flow`` and ``def``; ``tasks.locks.locked``
opens it too, before it takes its leases). Its tasks — in the flow's thread or Prefect's worker
threads, all carrying the run id — find it with :func:`run_context`. A subflow is a run of its
own with a context of its own: it never shares, nor closes, its parent's connections.

Where the config comes from: ops.yaml (``KMPOPS_CONFIG``), read and hashed once when the run
opens its context; or a config object a test hands over with :func:`config_override` (no YAML
to rewrite). Inside the run, ``tasks.common.ops_config()``, ``config_digest()``, ``records()``
and ``ensure_config_unchanged()`` answer from the context.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kmpops.config import OpsConfig
from kmpops.context import ConfigSnapshot, RunContext
from kmpops.records import Records

__all__ = [
    "config_override",
    "current_context",
    "in_run_context",
    "open_run_context",
    "run_context",
]

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
#: flow run id -> [context, how many open_run_context blocks of that run hold it]
_OPEN: dict[str, list[Any]] = {}
#: configs handed over by tests (innermost last); used instead of ops.yaml while set
_OVERRIDES: list[OpsConfig] = []
#: records stores by the records section they were built from (migrated once per process)
_RECORDS: dict[str, Records] = {}


@contextlib.contextmanager
def config_override(cfg: OpsConfig) -> Iterator[OpsConfig]:
    """Within the block, runs (and ``ops_config()`` outside a run) use ``cfg`` instead of
    ops.yaml: how a test builds a run's context from a config object. Process-wide (a flow
    run's worker threads see it too); nested blocks stack."""
    from tasks.common import install_redaction

    install_redaction(cfg)
    with _lock:
        _OVERRIDES.append(cfg)
    try:
        yield cfg
    finally:
        with _lock:
            _OVERRIDES.remove(cfg)


def overriding_config() -> OpsConfig | None:
    """The config a test handed over (:func:`config_override`), if any."""
    with _lock:
        return _OVERRIDES[-1] if _OVERRIDES else None


def records_for(cfg: OpsConfig) -> Records:
    """The records store ``cfg.records`` describes: built and migrated once per process."""
    from tasks.common import _load_prefect_secret

    key = cfg.records.model_dump_json()
    with _lock:
        rec = _RECORDS.get(key)
    if rec is None:
        built = Records.from_config(cfg, block_loader=_load_prefect_secret)
        built.migrate()
        with _lock:
            rec = _RECORDS.setdefault(key, built)
    return rec


def current_context() -> RunContext | None:
    """The context of the current flow run, if it opened one."""
    from tasks.common import run_id

    rid = run_id()
    if rid is None:
        return None
    with _lock:
        entry = _OPEN.get(rid)
    return entry[0] if entry is not None else None


def run_context() -> RunContext:
    """The context of the current flow run; RuntimeError if the run did not open one (a flow
    whose tasks need it is decorated with :func:`in_run_context` or ``locked``)."""
    ctx = current_context()
    if ctx is None:
        raise RuntimeError(
            "no run context: the flow calling this task must open one "
            "(tasks.context.in_run_context or tasks.locks.locked)"
        )
    return ctx


def _snapshot() -> ConfigSnapshot:
    from tasks.common import _load_current_config, config_path, frozen_snapshot, install_redaction

    given = overriding_config()
    if given is not None:
        return ConfigSnapshot.of(given)
    frozen = frozen_snapshot()  # the run read its config before it opened the context
    if frozen is not None:
        return frozen
    path = config_path()
    snap = ConfigSnapshot.load(path)
    install_redaction(snap.config)
    _load_current_config()  # keep the process cache (records, notifier) on the same file
    return snap


@contextlib.contextmanager
def open_run_context() -> Iterator[RunContext]:
    """Open the current flow run's context (or join it, when the run opened it already) for
    the block; the last block of the run to leave closes it (fleet and store).

    Raises RuntimeError outside a flow run, ConfigError for a config that does not validate."""
    from tasks.common import actor, run_id

    rid = run_id()
    if rid is None:
        raise RuntimeError("a run context is opened inside a flow run")
    with _lock:
        entry = _OPEN.get(rid)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        snap = _snapshot()
        ctx = RunContext(
            snap,
            run_id=rid,
            identity=actor(),
            records_factory=records_for,
            resolve_secret=_secret,
        )
        ctx.__enter__()
        with _lock:
            entry = _OPEN.setdefault(rid, [ctx, 0])
            entry[1] += 1
        if entry[0] is not ctx:  # another thread of the run opened it first
            ctx.close()
    try:
        yield entry[0]
    finally:
        with _lock:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                _OPEN.pop(rid, None)
        if last:
            entry[0].close()


def _secret(ref: Any) -> str:
    from tasks.common import secret

    return secret(ref)


def in_run_context(fn: F) -> F:
    """Decorate a flow function (under ``@flow``) so that its run opens its context before
    the body runs and closes it when the body returns or raises."""

    opener = open_run_context

    def inner(*args: Any, **kwargs: Any) -> Any:
        with opener():
            return fn(*args, **kwargs)

    # Prefect resolves the flow's (string) annotations in the function's globals: give the
    # wrapper the flow module's globals (it reads only its closure).
    rebound = types.FunctionType(
        inner.__code__, fn.__globals__, fn.__name__, inner.__defaults__, inner.__closure__
    )
    return functools.update_wrapper(rebound, fn)  # type: ignore[return-value]
