"""The lease history (``lease_grants``): every tenure of a target, written with the lease row,
on a real SQLite file. What the many-workers test reads to show no two runs held a target at
the same time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from kmpops.records import Records
from kmpops.records.models import Lease


@pytest.fixture
def rec(tmp_path: Path) -> Records:
    records = Records(f"sqlite:///{tmp_path / 'records.db'}")
    records.migrate()
    return records


def tenures(rec: Records, target: str) -> list[tuple[int, str, str, bool]]:
    return [
        (g.fence, g.holder, g.ended_how, g.ended_at is not None) for g in rec.lease_history(target)
    ]


def test_each_take_opens_a_tenure_and_release_closes_it(rec: Records) -> None:
    (a,), _ = rec.acquire_leases(["host:x"], holder="A", holder_name="run-A", ttl_seconds=30)
    rec.acquire_leases(["host:x"], holder="A", holder_name="run-A", ttl_seconds=30)  # extend
    _, busy = rec.acquire_leases(["host:x"], holder="B", holder_name="run-B", ttl_seconds=30)
    assert busy is not None  # a refused take leaves no trace
    assert tenures(rec, "host:x") == [(1, "A", "", False)]
    rec.release_leases([a])
    (b,), _ = rec.acquire_leases(["host:x"], holder="B", holder_name="run-B", ttl_seconds=30)
    history = rec.lease_history("host:x")
    assert [(g.fence, g.holder, g.ended_how) for g in history] == [
        (1, "A", "released"),
        (2, "B", ""),
    ]
    assert history[0].ended_at is not None and history[0].ended_at <= history[1].acquired_at
    assert history[1].holder_name == "run-B" and history[1].ended_at is None
    assert b.number == 2


def test_takeover_of_an_expired_lease_ends_the_old_tenure_at_its_expiry(rec: Records) -> None:
    rec.acquire_leases(["host:x"], holder="A", holder_name="run-A", ttl_seconds=30)
    expired = datetime.now(UTC) - timedelta(seconds=5)
    with rec.session() as s:  # A stopped renewing 5 s ago
        s.execute(update(Lease).values(expires_at=expired))
    rec.acquire_leases(["host:x"], holder="B", holder_name="run-B", ttl_seconds=30)
    old, new = rec.lease_history("host:x")
    assert (old.holder, old.ended_how, old.ended_at) == ("A", "expired", expired)
    assert (new.holder, new.fence, new.ended_at) == ("B", 2, None)
    assert old.ended_at < new.acquired_at


def test_a_dead_runs_leases_end_as_released_dead(rec: Records) -> None:
    rec.acquire_leases(["host:a", "host:b"], holder="dead", holder_name="x", ttl_seconds=30)
    rec.acquire_leases(["host:c"], holder="alive", holder_name="y", ttl_seconds=30)
    rec.release_leases_of("dead")
    assert tenures(rec, "host:a") == [(1, "dead", "released_dead", True)]
    assert tenures(rec, "host:c") == [(1, "alive", "", False)]
    # deploy-recover's take of a dead run's live lease closes that tenure too
    rec.acquire_leases(["host:d"], holder="dead", holder_name="x", ttl_seconds=30)
    rec.acquire_leases(
        ["host:d"], holder="recover", holder_name="r", ttl_seconds=30, take_from="dead"
    )
    assert tenures(rec, "host:d") == [(1, "dead", "released_dead", True), (2, "recover", "", False)]
