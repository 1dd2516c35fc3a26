"""Case tables for kmpops.plans.retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kmpops.plans.retention import BackupFact, BlobFact, RetentionPolicy, plan_retention

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
POLICY = RetentionPolicy(
    database=timedelta(days=30), configuration=timedelta(days=7), blob_grace=timedelta(hours=6)
)


def db(bid, days_old, verified=True, complete=True, subject="app"):
    return BackupFact(
        backup_id=bid,
        kind="database",
        subject=subject,
        created_at=NOW - timedelta(days=days_old),
        complete=complete,
        verified=verified,
    )


def cfg(bid, days_old, blobs, verified=True, subject="stg-1"):
    return BackupFact(
        backup_id=bid,
        kind="configuration",
        subject=subject,
        created_at=NOW - timedelta(days=days_old),
        verified=verified,
        blobs=frozenset(blobs),
    )


CASES = [
    # (name, backups, expected deleted ids)
    ("nothing expired", [db("a", 1), db("b", 29)], set()),
    ("expired with newer verified", [db("old", 40), db("new", 1)], {"old"}),
    ("expired, newer one unverified", [db("old", 40), db("new", 1, verified=None)], set()),
    (
        "expired, newer one failed verification",
        [db("old", 40), db("new", 1, verified=False)],
        set(),
    ),
    ("expired, newer one incomplete", [db("old", 40), db("new", 1, complete=False)], set()),
    ("all expired: keep the last verified", [db("a", 50), db("b", 45), db("c", 40)], {"a", "b"}),
    (
        "all expired, newest unverified: keep newest verified and everything after it",
        [db("a", 50), db("b", 45), db("c", 40, verified=None)],
        {"a"},
    ),
    (
        "expired failed backup deleted once a newer verified exists",
        [db("bad", 40, verified=False), db("good", 35)],
        {"bad"},
    ),
    (
        "expired incomplete backup deleted once a newer verified exists",
        [db("partial", 40, complete=False, verified=None), db("good", 2)],
        {"partial"},
    ),
    (
        "a verified backup in another database does not count",
        [db("old", 40, subject="app"), db("new", 1, subject="billing")],
        set(),
    ),
    ("exactly at retention is kept", [db("edge", 30), db("new", 1)], set()),
    (
        "configuration retention is 7 days",
        [cfg("c1", 8, ["k1"]), cfg("c2", 6, ["k1"]), cfg("c3", 1, ["k1"])],
        {"c1"},
    ),
    ("future timestamp (clock skew) is kept", [db("f", -1), db("o", 40, verified=None)], {"o"}),
]


@pytest.mark.parametrize(("name", "backups", "deleted"), CASES, ids=[c[0] for c in CASES])
def test_backup_decisions(name, backups, deleted):
    plan = plan_retention(backups, now=NOW, policy=POLICY)
    assert {d.backup_id for d in plan.to_delete} == deleted
    assert {d.backup_id for d in plan.decisions} == {b.backup_id for b in backups}
    # invariant: the newest verified backup of each group is never deleted
    groups = {}
    for b in backups:
        if b.complete and b.verified is True:
            key = (b.kind, b.subject)
            if key not in groups or b.created_at > groups[key].created_at:
                groups[key] = b
    assert not {b.backup_id for b in groups.values()} & deleted


def test_reasons_are_explicit():
    plan = plan_retention([db("old", 40), db("new", 1)], now=NOW, policy=POLICY)
    reasons = {d.backup_id: d.reason for d in plan.decisions}
    assert "newer verified backup new exists" in reasons["old"]
    assert "within retention" in reasons["new"]
    plan = plan_retention([db("only", 40)], now=NOW, policy=POLICY)
    assert "last verified" in plan.decisions[0].reason


BLOB_CASES = [
    (
        "blob of a deleted manifest still referenced by a kept one survives",
        [cfg("c1", 9, ["shared", "only-old"]), cfg("c2", 1, ["shared", "new"])],
        [("shared", 9), ("only-old", 9), ("new", 1)],
        {"only-old"},
    ),
    (
        "unreferenced blob younger than the grace period is kept (run in flight)",
        [cfg("c1", 1, ["a"])],
        [("a", 1), ("inflight", 0.1)],
        set(),
    ),
    (
        "orphan older than grace is deleted",
        [cfg("c1", 1, ["a"])],
        [("a", 1), ("orphan", 2)],
        {"orphan"},
    ),
    (
        "blobs of an expired manifest kept for lack of a newer verified one survive",
        [cfg("c1", 9, ["x"]), cfg("c2", 1, ["y"], verified=None)],
        [("x", 9), ("y", 1)],
        set(),
    ),
    (
        "blobs referenced by another host's kept manifest survive",
        [
            cfg("h1-old", 9, ["x"], subject="h1"),
            cfg("h1-new", 1, ["y"], subject="h1"),
            cfg("h2", 1, ["x"], subject="h2"),
        ],
        [("x", 9), ("y", 1)],
        set(),
    ),
]


@pytest.mark.parametrize(
    ("name", "backups", "blobs", "deleted"), BLOB_CASES, ids=[c[0] for c in BLOB_CASES]
)
def test_blob_decisions(name, backups, blobs, deleted):
    facts = [BlobFact(key=k, last_modified=NOW - timedelta(days=d)) for k, d in blobs]
    plan = plan_retention(backups, now=NOW, policy=POLICY, blobs=facts)
    assert set(plan.delete_blobs) == deleted
    assert plan.kept_blobs == len(blobs) - len(deleted)


def test_naive_datetimes_rejected():
    with pytest.raises(ValueError, match="timezone"):
        plan_retention([], now=datetime(2026, 1, 1), policy=POLICY)
    naive = BackupFact("x", "database", "app", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone"):
        plan_retention([naive], now=NOW, policy=POLICY)


def test_empty_plan():
    plan = plan_retention([], now=NOW, policy=POLICY)
    assert plan.empty and plan.decisions == ()
