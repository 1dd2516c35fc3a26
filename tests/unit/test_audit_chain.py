"""``verify_chain`` as a table of cases: events + key + checkpoints in, the problems out.

Events are built the way ``Records.audit`` builds them (HMAC over the canonical event and the
previous tag); each case then does to them what an attacker with write access to the records
database could do, and names the first problem ``kmpops audit verify`` must print.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from kmpops.records.audit import (
    GENESIS,
    AuditKey,
    Checkpoint,
    event_body,
    event_mac,
    export_lines,
    verify_chain,
)

KEY = AuditKey("k" * 40)
OTHER = AuditKey("o" * 40)
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Ev:
    seq: int
    ts: datetime
    actor: str
    action: str
    subject: str
    details: dict
    run_id: str | None
    prev_hash: str
    hash: str


def chain(n: int, key: AuditKey = KEY, actor: str = "alice") -> list[Ev]:
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        fields = dict(
            seq=seq,
            ts=T0 + timedelta(seconds=seq),
            actor=actor,
            action="deploy.step",
            subject="web",
            details={"i": seq},
            run_id=None,
            prev_hash=prev,
        )
        tag = event_mac(key, **fields)
        out.append(Ev(**fields, hash=tag))
        prev = tag
    return out


def sha256_chain(n: int) -> list[Ev]:
    """The whole chain recomputed consistently with plain sha256 (no key), as before."""
    out, prev = [], GENESIS
    for ev in chain(n, actor="mallory"):
        ev = replace(ev, prev_hash=prev)
        fields = {k: v for k, v in ev.__dict__.items() if k != "hash"}
        tag = hashlib.sha256(event_body(**fields).encode()).hexdigest()
        out.append(replace(ev, hash=tag))
        prev = tag
    return out


def cp(events: list[Ev], seq: int, key: AuditKey = KEY) -> Checkpoint:
    mac = events[seq - 1].hash if seq else GENESIS
    return Checkpoint.make(key, seq=seq, mac=mac, ts=T0 + timedelta(hours=seq), reason="t")


Case = Callable[[], tuple[list[Ev], list[Checkpoint]]]

CASES: list[tuple[str, Case, str | None]] = [
    ("intact, no checkpoint", lambda: (chain(4), []), None),
    (
        "intact, checkpoints at 2 and 4",
        lambda: (chain(4), [cp(chain(4), 2), cp(chain(4), 4)]),
        None,
    ),
    ("empty chain, empty checkpoint", lambda: ([], [cp([], 0)]), None),
    (
        "truncated 4 -> 2",
        lambda: (chain(4)[:2], [cp(chain(4), 4)]),
        "#3 truncation: the checkpoint of 2026-12-01T16:00:00+00:00 (seq 4) saw 4 events, "
        "the records hold 2; event #3 is the first missing",
    ),
    (
        "truncated to nothing",
        lambda: ([], [cp(chain(4), 4)]),
        "#1 truncation: the checkpoint of 2026-12-01T16:00:00+00:00 (seq 4) saw 4 events, "
        "the records hold 0; event #1 is the first missing",
    ),
    (
        "deleted middle event",
        lambda: ([e for e in chain(4) if e.seq != 2], [cp(chain(4), 4)]),
        "#2 deletion: missing: deleted (the next present event is #3)",
    ),
    (
        "deleted first event",
        lambda: (chain(4)[1:], []),
        "#1 deletion: missing: deleted (the next present event is #2)",
    ),
    (
        "edited field",
        lambda: ([*chain(4)[:2], replace(chain(4)[2], actor="mallory"), chain(4)[3]], []),
        "#3 rewrite: does not match its HMAC tag (changed, or the chain was recomputed "
        "without the audit key)",
    ),
    (
        "whole chain recomputed with sha256",
        lambda: (sha256_chain(4), []),
        "#1 rewrite: does not match its HMAC tag (changed, or the chain was recomputed "
        "without the audit key)",
    ),
    (
        "whole chain recomputed with another key",
        lambda: (chain(4, key=OTHER), []),
        "#1 rewrite: does not match its HMAC tag (changed, or the chain was recomputed "
        "without the audit key)",
    ),
    (
        "relinked event",
        lambda: ([chain(4)[0], replace(chain(4)[1], prev_hash="f" * 64), *chain(4)[2:]], []),
        "#2 rewrite: does not link to event #1 (prev tag)",
    ),
    (
        "chain replaced with valid tags after the checkpoint (someone had the key)",
        lambda: (chain(4, actor="bob"), [cp(chain(4), 2), cp(chain(4), 4)]),
        "#1 rewrite: events #1..#2 no longer match the checkpoint of 2026-12-01T14:00:00+00:00 "
        "(seq 2) (the chain was replaced after it)",
    ),
    (
        "forged checkpoint",
        lambda: (chain(2), [cp(chain(4), 4, key=OTHER)]),
        "#4 checkpoint: the checkpoint of 2026-12-01T16:00:00+00:00 (seq 4) has a bad "
        f"signature (forged, or signed with another key: {OTHER.key_id})",
    ),
    (
        "old checkpoint copied under a newer name (to hide the newer ones)",
        lambda: (chain(2), [replace(cp(chain(4), 2), named_seq=4, where="s3://b/k@v")]),
        "#2 checkpoint: checkpoint s3://b/k@v (seq 2) is stored under the name of seq 4: a copy",
    ),
    (
        "checkpoint edited after signing",
        lambda: (chain(2), [replace(cp(chain(4), 4), seq=2, mac=chain(2)[1].hash)]),
        "#2 checkpoint: the checkpoint of 2026-12-01T16:00:00+00:00 (seq 2) has a bad "
        f"signature (forged, or signed with another key: {KEY.key_id})",
    ),
]


@pytest.mark.parametrize(("name", "build", "first"), CASES, ids=[c[0] for c in CASES])
def test_verify_chain(name: str, build: Case, first: str | None) -> None:
    events, checkpoints = build()
    report = verify_chain(events, key=KEY, checkpoints=checkpoints)
    if first is None:
        assert report.ok, report.problems
        assert report.checkpoints == len(checkpoints)
    else:
        assert report.problem is not None
        got = f"#{report.problem.seq} {report.problem.kind}: {report.problem.reason}"
        assert got == first


def test_without_a_key_nothing_verifies() -> None:
    report = verify_chain(chain(3), key=None)
    assert [str(p) for p in report.problems] == [
        "audit event #1: key: records.audit_key is not configured: nothing can be verified"
    ]


def test_unreadable_checkpoints_are_problems() -> None:
    report = verify_chain(chain(1), key=KEY, unreadable=["checkpoint x is unreadable: bad json"])
    assert [str(p) for p in report.problems] == [
        "audit event #1: checkpoint: checkpoint x is unreadable: bad json"
    ]


def test_checkpoint_round_trips_and_export_lists_it_after_the_events() -> None:
    events = chain(2)
    checkpoint = cp(events, 2)
    again = Checkpoint.from_json(checkpoint.to_json(), where="file:1")
    assert again == checkpoint and again.signed_by(KEY) and not again.signed_by(OTHER)
    lines = list(export_lines(events, [again]))
    assert [line.split(",")[-1] for line in lines[:2]] == ['"type":"event"}'] * 2
    assert '"type":"checkpoint"' in lines[2] and '"where":"file:1"' in lines[2]


def test_short_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match=r"too short \(9 bytes; at least 32\)") as err:
        AuditKey("s3cr3t-xy")
    assert "s3cr3t" not in str(err.value)
    assert "k" * 40 not in repr(KEY)
