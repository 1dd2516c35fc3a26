"""Target locks, the Prefect side: take a run's leases (waiting visibly), renew them from a
daemon thread while the run lives, release them at the end, and hand each write its fence.

A mutating flow declares its targets with :func:`locked` (between ``@flow`` and ``def``), or
wraps a block in :class:`RunLocks` when it learns its targets inside the flow
(deploy-recover). The decisions (who may take a lease, what a write's fence must be, what a
busy wait does next) are :mod:`kmpops.locks`; the atomic acquire is the records store's
(:meth:`kmpops.records.Records.acquire_leases`). See :mod:`kmpops.locks` for why leases in the
records store and not Prefect's global concurrency limits.

While it waits for a busy target a run says so three ways: a log line, its Prefect state
message (a ``Running`` state named ``AwaitingLock``) and a ``lock-wait`` markdown artifact, each
naming the holder run and since when. The run's :class:`RunLocks` is registered under its
flow run id while held, so tasks of that run (in worker threads) find their fence with
:func:`fence_for` and pass it to the record they write.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
import types
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.context import FlowRunContext

from kmpops import locks as rules
from kmpops.config import LockPolicy
from kmpops.locks import BusyStep, Fence, LeaseView, LockBusy
from kmpops.records import Records
from tasks.common import audit, ops_config, records, run_id

__all__ = ["RunLocks", "fence_for", "held_fences", "locked"]

F = TypeVar("F", bound=Callable[..., Any])

_registry_lock = threading.Lock()
_HELD: dict[str, list[RunLocks]] = {}


def fence_for(target: str) -> Fence | None:
    """The fence the current flow run holds on ``target`` (None when it holds no lease on it:
    a task called outside a locking flow writes unchecked)."""
    from tasks.context import current_context

    ctx = current_context()
    if ctx is not None and ctx.fence(target) is not None:
        return ctx.fence(target)
    rid = run_id()
    if rid is None:
        return None
    with _registry_lock:
        for holder in _HELD.get(rid, []):
            fence = holder.fences.get(target)
            if fence is not None:
                return fence
    return None


def held_fences() -> list[Fence]:
    """Every fence the current flow run holds (for reports)."""
    rid = run_id()
    with _registry_lock:
        return [f for h in _HELD.get(rid or "", []) for f in h.fences.values()]


def _run_name() -> str:
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.name)
    return "(no flow run)"


def _procedure() -> str:
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow is not None:
        return str(ctx.flow.name)
    return "kmp-ops"


class RunLocks:
    """The leases one flow run holds on ``targets``; a context manager.

    ``__enter__`` takes every target in sorted order (:meth:`Records.acquire_leases`); on a
    busy one it follows the procedure's policy (``locks`` in ops.yaml): ``wait`` polls until
    the target is free or ``wait_timeout`` passed, ``refuse`` fails at once. Either failure
    raises LockBusy naming the target, the holder run and since when, after releasing what
    was taken — nothing else has happened yet. A daemon thread renews the leases every
    ``renew_interval`` (at most TTL/3); a lease found lost is logged and its writes are
    refused by the store (LeaseLost). ``__exit__`` stops the thread and releases the leases
    (a lease taken over meanwhile stays with its new holder). If the process dies, the
    leases expire after ``ttl``. ``take_from`` names a run known dead whose live leases may be
    taken at once (deploy-recover).
    """

    def __init__(
        self,
        targets: Iterable[str],
        *,
        procedure: str | None = None,
        take_from: str | None = None,
        rec: Records | None = None,
    ) -> None:
        self.targets = rules.sorted_targets(list(targets))
        self.procedure = procedure or _procedure()
        self.take_from = take_from
        self.fences: dict[str, Fence] = {}
        self.lost: set[str] = set()
        self.waited_s = 0.0
        self._rec = rec
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._run_id = ""

    # -- acquire --------------------------------------------------------------------------

    def __enter__(self) -> RunLocks:
        if not self.targets:
            return self
        rid = run_id()
        if rid is None:
            raise RuntimeError("RunLocks must be taken inside a flow run")
        self._run_id = rid
        from tasks.context import current_context

        ctx = current_context()
        rec = self._rec or records()
        settings = ops_config().locks
        policy: LockPolicy = settings.policy(self.procedure)
        ttl = settings.ttl.total_seconds()
        logger = get_run_logger()
        started = time.monotonic()
        announced: tuple[str | None, int] | None = None
        with _registry_lock:
            _HELD.setdefault(rid, []).append(self)
        try:
            while True:
                todo = [t for t in self.targets if t not in self.fences]
                won, busy = rec.acquire_leases(
                    todo,
                    holder=rid,
                    holder_name=_run_name(),
                    ttl_seconds=ttl,
                    take_from=self.take_from,
                )
                with _registry_lock:
                    self.fences.update({f.target: f for f in won})
                if ctx is not None:
                    ctx.hold(won)
                if self.fences and self._renewer is None:
                    self._start_renewer(rec, ttl, settings.renew_interval.total_seconds())
                if busy is None:
                    break
                waited = time.monotonic() - started
                step = rules.busy_step(policy.on_busy, waited, policy.wait_timeout.total_seconds())
                message = rules.busy_message(busy, datetime.now(UTC))
                if step is not BusyStep.WAIT:
                    verb = "refused" if step is BusyStep.REFUSE else f"gave up after {waited:.0f}s"
                    audit(
                        "lock.refused",
                        busy.target,
                        holder=busy.holder,
                        holder_name=busy.holder_name,
                        fence=busy.fence,
                        policy=policy.on_busy,
                        waited_s=round(waited, 3),
                    )
                    raise LockBusy(
                        f"{self.procedure}: {verb} (locks.on_busy={policy.on_busy}): {message}"
                    )
                if announced != (busy.holder, busy.fence):
                    announced = (busy.holder, busy.fence)
                    self._announce_wait(busy, message, policy)
                    logger.warning("waiting for lock: %s", message)
                time.sleep(settings.poll_interval.total_seconds())
        except BaseException:
            self._close(rec, released_by="acquire failed")
            raise
        self.waited_s = round(time.monotonic() - started, 3)
        if announced is not None:
            self._set_state_message(None)
        audit(
            "lock.acquired",
            self.procedure,
            fences={f.target: f.number for f in self.fences.values()},
            waited_s=self.waited_s,
            take_from=self.take_from,
        )
        logger.info(
            "holding %d lock(s) (%s)%s",
            len(self.fences),
            ", ".join(f"{f.target}#{f.number}" for f in self.fences.values())[:500],
            f" after waiting {self.waited_s:g}s" if announced else "",
        )
        return self

    def _announce_wait(self, busy: LeaseView, message: str, policy: LockPolicy) -> None:
        from tasks.artifacts import create_markdown_artifact

        self._set_state_message(f"waiting for lock: {message}")
        try:
            create_markdown_artifact(
                markdown=(
                    f"# Waiting for a lock\n\n| | |\n|---|---|\n| target | `{busy.target}` |\n"
                    f"| held by run | {busy.holder_name} (`{busy.holder}`) |\n"
                    f"| since | {busy.acquired_at:%Y-%m-%d %H:%M:%S}Z |\n"
                    f"| fence | {busy.fence} |\n| lease expires | "
                    f"{busy.expires_at:%Y-%m-%d %H:%M:%S}Z |\n| policy | {policy.on_busy}, "
                    f"up to {policy.wait_timeout.total_seconds():g}s |\n"
                    if busy.acquired_at and busy.expires_at
                    else f"# Waiting for a lock\n\n{message}\n"
                ),
                key="lock-wait",
                description=message[:500],
            )
        except Exception as exc:  # the wait itself goes on: the log line says the same
            get_run_logger().warning("could not publish the lock-wait artifact: %s", exc)

    def _set_state_message(self, message: str | None) -> None:
        """Show (or clear) the wait in the run's Prefect state (a Running state named
        AwaitingLock); best effort — the log line and artifact say the same."""
        from prefect.client.orchestration import get_client
        from prefect.states import Running

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return
        try:
            with get_client(sync_client=True) as client:
                state = (
                    Running(name="AwaitingLock", message=message[:2000])
                    if message
                    else Running(message="lock acquired")
                )
                client.set_flow_run_state(ctx.flow_run.id, state, force=True)
        except Exception as exc:
            get_run_logger().warning("could not set the run's state message: %s", exc)

    # -- renew ----------------------------------------------------------------------------

    def _start_renewer(self, rec: Records, ttl: float, configured: float) -> None:
        interval = rules.renew_interval(ttl, configured)
        logger = get_run_logger()

        def renew() -> None:
            while not self._stop.wait(interval):
                with _registry_lock:
                    live = [f for t, f in self.fences.items() if t not in self.lost]
                if not live:
                    continue
                try:
                    lost = rec.renew_leases(live, ttl_seconds=ttl)
                except Exception as exc:  # the store is down: try again next interval
                    logger.warning("could not renew %d lock(s): %s", len(live), exc)
                    continue
                for fence in lost:
                    self.lost.add(fence.target)
                    logger.error(
                        "LOST lock %s (fence %d): its writes will be refused",
                        fence.target,
                        fence.number,
                    )

        self._renewer = threading.Thread(
            target=renew, name=f"kmpops-lock-renewer-{self._run_id[:8]}", daemon=True
        )
        self._renewer.start()

    # -- release --------------------------------------------------------------------------

    def __exit__(self, *exc: object) -> None:
        if self.targets and self._run_id:
            self._close(self._rec or records(), released_by="run ended")

    def _close(self, rec: Records, *, released_by: str) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        freed: list[str] = []
        try:
            if self.fences:
                freed = rec.release_leases(list(self.fences.values()))
        finally:
            from tasks.context import current_context

            ctx = current_context()
            if ctx is not None:
                ctx.drop(self.fences)
            with _registry_lock:
                held = _HELD.get(self._run_id, [])
                if self in held:
                    held.remove(self)
                if not held:
                    _HELD.pop(self._run_id, None)
        if self.fences:
            audit(
                "lock.released",
                self.procedure,
                fences={f.target: f.number for f in self.fences.values()},
                freed=len(freed),
                lost=sorted(self.lost),
                why=released_by,
            )


def locked(targets: Callable[..., Iterable[str]]) -> Callable[[F], F]:
    """Decorate a flow function (under ``@flow``) so that it runs in its run context
    (``tasks.context``: the frozen config, records, fleet, store, identity — opened first) and
    holding the leases on ``targets(**its arguments)``, taken before its body reads anything
    and released when it returns or raises (LockBusy, before the body runs, when the policy
    gives up waiting)."""
    from tasks.context import open_run_context

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)
        run_locks = RunLocks
        opener = open_run_context

        def inner(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with opener(), run_locks(targets(**bound.arguments)):
                return fn(*args, **kwargs)

        # Prefect resolves the flow's (string) annotations in the function's globals: give
        # the wrapper the flow module's globals (it reads only its closure).
        rebound = types.FunctionType(
            inner.__code__, fn.__globals__, fn.__name__, inner.__defaults__, inner.__closure__
        )
        return functools.update_wrapper(rebound, fn)  # type: ignore[return-value]

    return wrap


# -- the targets of each procedure (decided from config and parameters, before any state) ---


def deploy_targets(service: str, environment: str) -> list[str]:
    """deploy-pipeline: the service in each environment it deploys to (staging first when the
    target is not staging) and every host of those environments (so access and key changes of
    those hosts wait for it)."""
    cfg = ops_config()
    cfg.service(service)
    cfg.environment(environment)
    envs = (
        ["staging", environment]
        if environment != "staging" and "staging" in cfg.environments
        else [environment]
    )
    return [rules.service_target(service, env) for env in envs] + [
        rules.host_target(h.name) for env in envs for h in cfg.environment(env).hosts
    ]


def host_targets(environment: str | None = None) -> list[str]:
    """Every host of ``environment`` (default: of every environment): access and key changes."""
    cfg = ops_config()
    envs = [cfg.environment(environment)] if environment else list(cfg.environments.values())
    return [rules.host_target(h.name) for env in envs for h in env.hosts]


def database_targets(databases: Iterable[str] | None = None) -> list[str]:
    """The named databases (default: every configured one): backups and restores."""
    names = list(databases) if databases else sorted(ops_config().databases)
    return [rules.database_target(n) for n in names]


def recovery_targets(service: str, hosts: Iterable[tuple[str, str]]) -> list[str]:
    """deploy-recover: the service in each environment and the hosts it puts back."""
    keys = list(hosts)
    return [rules.service_target(service, env) for env in sorted({e for e, _ in keys})] + [
        rules.host_target(h) for _, h in keys
    ]


def release_dead_run_locks(dead_run_id: str, why: str) -> list[str]:
    """Free every lease still held by run ``dead_run_id`` (known dead: Crashed, or marked so by
    an operator); audited as ``lock.released_dead``. Returns the targets freed."""
    held = records().release_leases_of(dead_run_id)
    if held:
        audit(
            "lock.released_dead",
            f"flow-run/{dead_run_id}",
            fences={lease.target: lease.fence for lease in held},
            why=why,
        )
        get_run_logger().warning(
            "released %d lock(s) of dead run %s: %s",
            len(held),
            dead_run_id,
            ", ".join(lease.target for lease in held)[:500],
        )
    return [lease.target for lease in held]


def patch_targets(environment: str) -> list[str]:
    """patch-hosts: every host of staging (when the target is not staging and there is one)
    and of ``environment``: a deploy or an access change of those hosts waits for it."""
    cfg = ops_config()
    cfg.environment(environment)
    envs = (
        ["staging", environment]
        if environment != "staging" and "staging" in cfg.environments
        else [environment]
    )
    return [rules.host_target(h.name) for env in envs for h in cfg.environment(env).hosts]
