"""Flow-run heartbeats that stop the moment their run ends (Prefect 3.9's wait up to 1 s more).

Prefect 3.9 sends a flow run's heartbeats (``prefect.flow-run.heartbeat`` events, every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` s, 180 by default) from a daemon thread started by
``prefect.flow_engine._send_heartbeats``. That thread sleeps in 1 s steps and the engine joins it
(``join(timeout=2)``) when the run ends, so every flow called in a process (the CLI, the
benchmarks, the tests, a worker's flow process) returns 0-1 s after the server already shows the
run Completed — about half a second on average, measured by ``bench/bench_deploy.py`` as the gap
between "Completed" and "call returned" (PrefectHQ/prefect#19641 introduced the loop).

kmp-ops relies on those heartbeats (``deployments/automations.py`` marks a run whose heartbeats
stop Crashed, which starts ``deploy-recover``), so it does not turn them off. :func:`install`
replaces the context manager with one that sends the same events on the same schedule through
the engine's own ``_emit_flow_run_heartbeat``, and waits on its stop event instead of sleeping,
so the join returns at once. It replaces Prefect's only when that function has the shape this
module was written against (Prefect 3.9, pinned in pyproject.toml); otherwise Prefect's stays
and :func:`installed` says so. Importing :mod:`tasks` installs it (every flow imports tasks
before Prefect's engine enters the run).
"""

from __future__ import annotations

import contextvars
import inspect
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

__all__ = ["install", "installed", "send_heartbeats"]

_JOIN_TIMEOUT_S = 2.0  # as Prefect's: never hang a process on a stuck emit


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Generator[None, None, None]:
    """Send the run's heartbeats while the block runs; stop as soon as it exits.

    Same contract as Prefect 3.9's ``_send_heartbeats``: nothing when the heartbeat frequency
    is unset; otherwise one heartbeat at once and then one every ``max(frequency, minimum)`` s
    until the run is final or the block exits; emit errors are logged at debug and never raised.
    """
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    period = engine.heartbeat_seconds
    if period is None:
        yield
        return
    period = max(period, MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run and run.state and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            if stop.wait(period):
                return

    # The thread sees the caller's context (its SettingsContext, hence its PREFECT_API_URL), as
    # Prefect's does: an empty context would fall back to the import-time settings.
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(loop,), daemon=True, name="kmpops-heartbeat"
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=_JOIN_TIMEOUT_S)


def _compatible(engine_module: Any) -> bool:
    """True when Prefect's engine has what :func:`send_heartbeats` uses, in the shape it uses."""
    original = getattr(engine_module, "_send_heartbeats", None)
    if original is None or not hasattr(engine_module, "MINIMUM_HEARTBEAT_INTERVAL"):
        return False
    engine_cls = getattr(engine_module, "BaseFlowRunEngine", None)
    if engine_cls is None or not all(
        hasattr(engine_cls, name)
        for name in (
            "heartbeat_seconds",
            "_build_heartbeat_event_template",
            "_emit_flow_run_heartbeat",
        )
    ):
        return False
    try:
        params = list(inspect.signature(inspect.unwrap(original)).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["engine", "join_on_exit"]


def install() -> bool:
    """Put :func:`send_heartbeats` in place of Prefect's; idempotent. Returns whether it is in
    place (False, Prefect's left alone, when the engine is not the shape it expects)."""
    import prefect.flow_engine as engine_module

    if engine_module._send_heartbeats is send_heartbeats:
        return True
    if not _compatible(engine_module):
        return False
    engine_module._send_heartbeats = send_heartbeats
    return True


def installed() -> bool:
    """Whether flow runs in this process send their heartbeats through :func:`send_heartbeats`."""
    import prefect.flow_engine as engine_module

    return engine_module._send_heartbeats is send_heartbeats
