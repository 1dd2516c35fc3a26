"""Target locks: leases on what a procedure changes, with fencing numbers (pure decisions).

A *target* is what one mutating procedure must have to itself while it runs: a service in an
environment (``service:web@production``), a database (``database:appdb``), a host for access
and key changes (``host:prd-1``), or a procedure that must not overlap itself
(``procedure:evaluate-alerts``). A run takes a *lease* on each of its targets before it reads
any state it will act on, renews it while it lives, and releases it at the end. Each acquire
increments the target's *fencing number*; every write of a result (a release record, a backup
catalog entry) names the lease it was made under and is refused unless that lease is still the
live one — so a run that lost its lease (it stalled past the TTL, or was declared dead) cannot
record over a newer run's work.

This module holds the decisions only (no I/O, no Prefect): who may take a lease, whether a
write's fence is still valid, what a busy wait does next, how often to renew, and the words an
operator sees. The lease table and its atomic conditional UPDATE live in
:mod:`kmpops.records.repository`; the Prefect side (acquire-with-wait, the renewing thread, the
state message and artifact) in ``tasks/locks.py``.

DESIGN notes — why a lease table in the records store, not Prefect global concurrency limits
---------------------------------------------------------------------------------------------
* **Fencing.** A concurrency-limit slot says "someone may run", not *who* holds a target or
  since when, and carries no number that a later write can be checked against. Our writes of
  results go to the records store; a lease row in the same database lets the write and the
  fence check commit in one transaction (the check is a conditional UPDATE of the lease row in
  the writer's transaction, so a takeover cannot slip between check and write).
* **Leaks.** Prefect's GCL leases have been seen to leak slots (a crashed run's slot stays
  occupied: PrefectHQ/prefect#17415, #21794) and need ``strict=True`` or a missing limit means
  no limit at all. Our lease expires by itself (``expires_at``) when its run stops renewing it,
  and ``deploy-recover`` releases a crashed run's leases explicitly.
* **Per-target names.** Targets are created on first use (one row per target, kept after
  release so the fencing number stays monotonic); a GCL would have to be created for every
  service in every environment, database and host in advance.
* **Both databases.** The table is plain SQLAlchemy. An acquire is one transaction:
  ``INSERT … ON CONFLICT DO NOTHING`` (every target has a row), ``SELECT … ORDER BY target FOR
  UPDATE`` (PostgreSQL locks the rows in target order; on SQLite the insert already holds the
  database's single write lock), :func:`decide_acquire` on each row, then one conditional
  ``UPDATE … WHERE target IN (…) AND (holder IS NULL OR expires_at <= :now …)`` that repeats
  the decision; so two processes cannot both win (tested with racing processes on both).
* **Visibility.** The waiting run's Prefect state message, a markdown artifact and a log line
  name the holder run and since when; ``kmpops locks`` lists the table.
* **Clocks.** Expiry uses the acquiring process's clock (UTC). Hosts running workers must keep
  their clocks within a small fraction of the TTL (NTP); renewal runs at most every TTL/3.
* **Granularity.** deploy-pipeline takes its hosts as well as the service in each
  environment, so key rotation and access changes of those hosts wait for it; the price is
  that deploys of two different services onto the same hosts also run one after the other
  (shared/exclusive host leases would lift that, at the cost of a second lease mode).
* **Deadlocks.** A run takes its targets in sorted order and, when one is busy, waits for it
  holding only those before it; runs taking overlapping sets therefore cannot wait on each
  other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from kmpops.errors import KmpOpsError

__all__ = [
    "AcquireDecision",
    "BusyStep",
    "Fence",
    "LeaseLost",
    "LeaseView",
    "LockBusy",
    "busy_message",
    "busy_step",
    "database_target",
    "decide_acquire",
    "fence_refusal",
    "host_target",
    "procedure_target",
    "renew_interval",
    "service_target",
    "sorted_targets",
]

MIN_TTL_SECONDS = 1.0


class LockBusy(KmpOpsError):
    """A target is held by another run and the policy refused to wait (or the wait timed out);
    nothing was changed. The message names the target, the holder run and since when."""


class LeaseLost(KmpOpsError):
    """A write of a result was refused: the lease it was made under is no longer the live one
    (expired, released, or taken over by a newer run with a higher fencing number)."""


def _check_part(value: str, what: str) -> str:
    if not value or any(c in value for c in ":@ \t\n") or len(value) > 120:
        raise ValueError(f"{what} {value!r} cannot name a lock target")
    return value


def service_target(service: str, environment: str) -> str:
    """The target of a service in an environment (what deploy-pipeline takes)."""
    return f"service:{_check_part(service, 'service')}@{_check_part(environment, 'environment')}"


def database_target(database: str) -> str:
    """The target of a configured database (backup-database, restore-database)."""
    return f"database:{_check_part(database, 'database')}"


def host_target(host: str) -> str:
    """The target of a host (access and key changes, and every deploy touching the host)."""
    return f"host:{_check_part(host, 'host')}"


def procedure_target(flow_name: str) -> str:
    """The target of a procedure that must not overlap itself (evaluate-alerts)."""
    return f"procedure:{_check_part(flow_name, 'procedure')}"


def sorted_targets(targets: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Targets deduplicated in the one global order every run acquires them in."""
    return sorted(set(targets))


@dataclass(frozen=True)
class LeaseView:
    """One lease row as read from the store (``holder`` None: free)."""

    target: str
    holder: str | None
    holder_name: str  # the holder's run name; after release, the last holder's
    fence: int
    acquired_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True)
class Fence:
    """What a write of a result carries: the target, the run holding it and its number."""

    target: str
    holder: str
    number: int


class AcquireDecision(StrEnum):
    """What an acquire attempt does with a target's current lease row."""

    TAKE = "take"  # free (never held, or released): new fencing number
    TAKE_EXPIRED = "take_expired"  # its holder stopped renewing: taken over, new number
    TAKE_FROM_DEAD = "take_from_dead"  # deploy-recover takes the crashed run's lease
    ALREADY_HELD = "already_held"  # this run holds it: extended, same number
    BUSY = "busy"  # another live run holds it


def decide_acquire(
    lease: LeaseView | None, *, me: str, now: datetime, take_from: str | None = None
) -> AcquireDecision:
    """Whether run ``me`` may take ``lease`` at ``now`` (the spec of the store's conditional
    UPDATE; ``take_from`` is a run known dead whose live lease may be taken)."""
    if lease is None or lease.holder is None:
        return AcquireDecision.TAKE
    if lease.holder == me:
        return AcquireDecision.ALREADY_HELD
    if lease.expires_at is None or lease.expires_at <= now:
        return AcquireDecision.TAKE_EXPIRED
    if take_from is not None and lease.holder == take_from:
        return AcquireDecision.TAKE_FROM_DEAD
    return AcquireDecision.BUSY


def fence_refusal(lease: LeaseView | None, fence: Fence, now: datetime) -> str | None:
    """Why a write under ``fence`` must be refused given the target's lease row, or None if
    the fence is still the live lease (same holder, same number, not expired)."""
    where = f"{fence.target} (fence {fence.number}, run {fence.holder})"
    if lease is None:
        return f"write refused: no lease on {where} was ever taken"
    if lease.fence > fence.number:
        name = lease.holder_name or lease.holder or "(unknown)"
        since = " (released since)" if lease.holder is None else ""
        return (
            f"write refused: the lease on {where} was taken over by run {name} "
            f"with fence {lease.fence}{since}"
        )
    if lease.holder != fence.holder or lease.fence != fence.number:
        return f"write refused: the lease on {where} was released"
    if lease.expires_at is None or lease.expires_at <= now:
        return f"write refused: the lease on {where} expired at {_when(lease.expires_at)}"
    return None


class BusyStep(StrEnum):
    """What a run does next while a target is busy."""

    WAIT = "wait"
    REFUSE = "refuse"  # policy ``refuse``: fail at once, naming the holder
    TIMED_OUT = "timed_out"  # policy ``wait`` and the wait timeout has passed


def busy_step(on_busy: str, waited_seconds: float, wait_timeout_seconds: float) -> BusyStep:
    """The policy's answer to a busy target after waiting ``waited_seconds``."""
    if on_busy == "refuse":
        return BusyStep.REFUSE
    if on_busy != "wait":
        raise ValueError(f"on_busy must be 'wait' or 'refuse', not {on_busy!r}")
    return BusyStep.TIMED_OUT if waited_seconds >= wait_timeout_seconds else BusyStep.WAIT


def renew_interval(ttl_seconds: float, configured_seconds: float) -> float:
    """Seconds between renewals: the configured interval, bounded to at most a third of the
    TTL (two renewals may fail before the lease expires) and at least 0.1 s."""
    if ttl_seconds < MIN_TTL_SECONDS:
        raise ValueError(f"lock ttl must be at least {MIN_TTL_SECONDS:g}s, got {ttl_seconds:g}s")
    return max(0.1, min(configured_seconds, ttl_seconds / 3))


def expiry(now: datetime, ttl_seconds: float) -> datetime:
    """When a lease taken or renewed at ``now`` expires."""
    return now + timedelta(seconds=ttl_seconds)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "(never)"


def busy_message(lease: LeaseView, now: datetime) -> str:
    """One line naming who holds ``lease`` and since when (state message, log, errors)."""
    since = lease.acquired_at
    held_for = f", for {int((now - since).total_seconds())}s" if since is not None else ""
    return (
        f"{lease.target} is held by run {lease.holder_name or lease.holder} "
        f"(id {lease.holder}) since {_when(since)}{held_for}; fence {lease.fence}, "
        f"lease expires {_when(lease.expires_at)}"
    )
