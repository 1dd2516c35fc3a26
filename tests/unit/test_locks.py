"""Lock decisions as case tables (kmpops.locks), and the records store's lease table agreeing
with them on a real SQLite file — including processes racing for one target."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from kmpops.config import LocksConfig, parse_config
from kmpops.errors import ConfigError
from kmpops.locks import (
    AcquireDecision,
    BusyStep,
    Fence,
    LeaseLost,
    LeaseView,
    busy_message,
    busy_step,
    database_target,
    decide_acquire,
    fence_refusal,
    host_target,
    procedure_target,
    renew_interval,
    service_target,
    sorted_targets,
)
from kmpops.records import Records
from kmpops.records.models import Lease

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
LIVE = NOW + timedelta(seconds=30)
GONE = NOW - timedelta(seconds=1)


def lease(holder: str | None, expires: datetime | None, fence: int = 3) -> LeaseView:
    return LeaseView(
        target="service:web@production",
        holder=holder,
        holder_name=f"run-{holder}" if holder else "",
        fence=fence,
        acquired_at=NOW - timedelta(seconds=10) if holder else None,
        expires_at=expires,
    )


ACQUIRE_CASES = [
    # (case, lease row, take_from, decision)
    ("never taken", None, None, AcquireDecision.TAKE),
    ("released", lease(None, None), None, AcquireDecision.TAKE),
    ("held by another, live", lease("B", LIVE), None, AcquireDecision.BUSY),
    ("held by another, expired", lease("B", GONE), None, AcquireDecision.TAKE_EXPIRED),
    ("expires exactly now", lease("B", NOW), None, AcquireDecision.TAKE_EXPIRED),
    ("held by me, live", lease("A", LIVE), None, AcquireDecision.ALREADY_HELD),
    ("held by the dead run", lease("B", LIVE), "B", AcquireDecision.TAKE_FROM_DEAD),
    ("dead run named, another holds it", lease("C", LIVE), "B", AcquireDecision.BUSY),
]


@pytest.mark.parametrize(("case", "row", "take_from", "decision"), ACQUIRE_CASES)
def test_decide_acquire(case: str, row: LeaseView | None, take_from: str | None, decision) -> None:
    assert decide_acquire(row, me="A", now=NOW, take_from=take_from) is decision, case


FENCE = Fence(target="service:web@production", holder="A", number=3)
FENCE_CASES = [
    ("live lease, same number", lease("A", LIVE, 3), None),
    ("taken over by a newer run", lease("B", LIVE, 4), "taken over by run run-B with fence 4"),
    ("taken over then released", lease(None, None, 5), "with fence 5 (released since)"),
    ("released by its holder", lease(None, None, 3), "was released"),
    ("expired, nobody took it", lease("A", GONE, 3), "expired at"),
    ("never taken", None, "no lease"),
]


@pytest.mark.parametrize(("case", "row", "refusal"), FENCE_CASES)
def test_fence_refusal(case: str, row: LeaseView | None, refusal: str | None) -> None:
    why = fence_refusal(row, FENCE, NOW)
    if refusal is None:
        assert why is None, case
    else:
        assert why is not None and refusal in why and "fence 3" in why, (case, why)


BUSY_CASES = [
    ("wait", 0.0, 60.0, BusyStep.WAIT),
    ("wait", 59.9, 60.0, BusyStep.WAIT),
    ("wait", 60.0, 60.0, BusyStep.TIMED_OUT),
    ("refuse", 0.0, 60.0, BusyStep.REFUSE),
    ("wait", 0.0, 0.0, BusyStep.TIMED_OUT),
]


@pytest.mark.parametrize(("on_busy", "waited", "timeout", "step"), BUSY_CASES)
def test_busy_step(on_busy: str, waited: float, timeout: float, step: BusyStep) -> None:
    assert busy_step(on_busy, waited, timeout) is step


def test_busy_step_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="on_busy must be"):
        busy_step("skip", 0, 1)


@pytest.mark.parametrize(
    ("ttl", "configured", "interval"),
    [(60, 10, 10), (60, 30, 20), (3, 10, 1), (1, 0.01, 0.1)],
)
def test_renew_interval_is_bounded(ttl: float, configured: float, interval: float) -> None:
    assert renew_interval(ttl, configured) == pytest.approx(interval)


def test_renew_interval_refuses_a_tiny_ttl() -> None:
    with pytest.raises(ValueError, match="at least 1s"):
        renew_interval(0.5, 0.1)


def test_targets_and_order() -> None:
    assert service_target("web", "production") == "service:web@production"
    assert database_target("appdb") == "database:appdb"
    assert host_target("prd-1") == "host:prd-1"
    assert procedure_target("evaluate-alerts") == "procedure:evaluate-alerts"
    assert sorted_targets(["host:b", "host:a", "host:b"]) == ["host:a", "host:b"]
    for bad in ("", "a:b", "a@b", "a b"):
        with pytest.raises(ValueError, match="cannot name a lock target"):
            host_target(bad)


def test_busy_message_names_holder_and_since() -> None:
    text = busy_message(lease("B", LIVE), NOW)
    assert "held by run run-B (id B)" in text
    assert "since 2026-12-02 11:59:50Z, for 10s" in text and "fence 3" in text


def test_locks_config_bounds() -> None:
    assert parse_config({}).locks == LocksConfig()
    cfg = parse_config({"locks": {"procedures": {"evaluate-alerts": {"on_busy": "refuse"}}}})
    assert cfg.locks.policy("evaluate-alerts").on_busy == "refuse"
    assert cfg.locks.policy("deploy-pipeline").on_busy == "wait"
    for bad, message in [
        ({"ttl": 6, "renew_interval": 3}, "at most a third of ttl"),
        ({"ttl": 0.5, "renew_interval": 0.1}, "ttl must be at least 1s"),
        ({"on_busy": "skip"}, "locks.on_busy"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"stale": 1}, "locks.stale: unknown key"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config({"locks": bad})
        assert any(message in p for p in err.value.problems), (bad, err.value.problems)


# -- the lease table on a real SQLite file ----------------------------------------------------


@pytest.fixture
def rec(tmp_path: Path) -> Records:
    records = Records(f"sqlite:///{tmp_path / 'records.db'}")
    records.migrate()
    return records


def set_lease(rec: Records, target: str, row: LeaseView | None) -> None:
    """Put the table in the state of a case row (NOW-relative times made real-time)."""
    if row is None:
        return
    shift = datetime.now(UTC) - NOW
    rec.acquire_leases([target], holder="seed", holder_name="seed", ttl_seconds=60)
    with rec.session() as s:
        s.execute(
            update(Lease)
            .where(Lease.target == target)
            .values(
                holder=row.holder,
                holder_name=row.holder_name,
                fence=row.fence,
                acquired_at=row.acquired_at + shift if row.acquired_at else None,
                expires_at=row.expires_at + shift if row.expires_at else None,
            )
        )


@pytest.mark.parametrize(("case", "row", "take_from", "decision"), ACQUIRE_CASES)
def test_store_agrees_with_decide_acquire(
    rec: Records, case: str, row: LeaseView | None, take_from: str | None, decision
) -> None:
    target = "service:web@production"
    set_lease(rec, target, row)
    before = rec.lease(target)
    won, busy = rec.acquire_leases(
        [target], holder="A", holder_name="run-A", ttl_seconds=30, take_from=take_from
    )
    after = rec.lease(target)
    assert after is not None
    if decision is AcquireDecision.BUSY:
        assert won == [] and busy is not None and busy.holder == row.holder, case
        assert after == before, case  # nothing changed
        return
    assert busy is None and len(won) == 1 and after.holder == "A", case
    old = before.fence if before is not None else 0
    expected = old if decision is AcquireDecision.ALREADY_HELD else old + 1
    assert won[0].number == after.fence == expected, case


def test_acquire_stops_at_the_first_busy_target(rec: Records) -> None:
    rec.acquire_leases(["host:b"], holder="B", holder_name="run-B", ttl_seconds=30)
    won, busy = rec.acquire_leases(
        ["host:a", "host:b", "host:c"], holder="A", holder_name="run-A", ttl_seconds=30
    )
    assert [f.target for f in won] == ["host:a"] and busy is not None and busy.target == "host:b"
    assert rec.lease("host:c") is None or rec.lease("host:c").holder is None


def test_fencing_refuses_a_stale_holder_and_changes_nothing(rec: Records) -> None:
    target = "service:web@production"
    (old,), _ = rec.acquire_leases([target], holder="A", holder_name="run-A", ttl_seconds=30)
    rec.record_release(service="web", environment="production", host="h1", version="1", fence=old)
    with rec.session() as s:  # A stalls past its TTL...
        s.execute(update(Lease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    (new,), _ = rec.acquire_leases([target], holder="B", holder_name="run-B", ttl_seconds=30)
    assert new.number == old.number + 1
    with pytest.raises(LeaseLost, match=r"taken over by run run-B with fence 2"):
        rec.record_release(
            service="web", environment="production", host="h1", version="2", fence=old
        )
    current = rec.current_release("web", "production", "h1")
    assert current is not None and current.version == "1" and current.fence == 1
    rec.record_release(service="web", environment="production", host="h1", version="3", fence=new)
    assert rec.current_release("web", "production", "h1").fence == 2
    assert rec.renew_leases([old, new], ttl_seconds=30) == [old]
    with rec.session() as s:  # B renews late, nobody took it meanwhile: still B's, same number
        s.execute(update(Lease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    with pytest.raises(LeaseLost, match="expired at"):
        rec.record_release(
            service="web", environment="production", host="h1", version="4", fence=new
        )
    assert rec.renew_leases([new], ttl_seconds=30) == []
    assert rec.release_leases([old]) == []  # a stale holder cannot free the new lease
    assert rec.release_leases([new]) == [target]
    assert rec.lease(target).holder is None and rec.lease(target).fence == 2


def test_backup_catalog_entry_checks_its_fence(rec: Records) -> None:
    target = "database:appdb"
    (fence,), _ = rec.acquire_leases([target], holder="A", holder_name="run-A", ttl_seconds=30)
    row = rec.start_backup(kind="database", name="appdb", key="k", fence=fence)
    rec.release_leases([fence])
    with pytest.raises(LeaseLost, match="was released"):
        rec.finish_backup(row.id, state="complete", size=1, fence=fence)
    assert rec.backup(row.id).state == "running"
    rec.finish_backup(row.id, state="failed", fence=fence)  # recording a failure is allowed
    assert rec.backup(row.id).state == "failed"


def test_release_leases_of_a_dead_run(rec: Records) -> None:
    rec.acquire_leases(["host:a", "host:b"], holder="dead", holder_name="x", ttl_seconds=30)
    rec.acquire_leases(["host:c"], holder="alive", holder_name="y", ttl_seconds=30)
    freed = rec.release_leases_of("dead")
    assert sorted(v.target for v in freed) == ["host:a", "host:b"]
    assert [v.target for v in rec.leases()] == ["host:c"]


RACE = """
import sys
from kmpops.records import Records
rec = Records(sys.argv[1])
won, busy = rec.acquire_leases(["service:web@production"], holder=sys.argv[2],
                               holder_name=sys.argv[2], ttl_seconds=60)
print("WON" if won else "BUSY")
"""


def test_processes_racing_for_one_target_exactly_one_wins(rec: Records, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, rec.url, f"racer-{i}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outcomes
    assert sorted(out.strip() for out, _ in outcomes) == ["BUSY"] * 5 + ["WON"]
    held = rec.lease("service:web@production")
    assert held is not None and held.fence == 1 and held.holder.startswith("racer-")
