"""The tamper-evident audit chain: each event stores the sha256 of the previous one.

``event_hash`` is sha256 over a canonical JSON encoding (sorted keys, no whitespace, UTC ISO
timestamps) of the event's fields and the previous hash. Editing, deleting or reordering any row
breaks the chain at that row, which :func:`verify_chain` names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, compact separators, datetimes as UTC ISO-8601."""

    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return obj.astimezone(UTC).isoformat()
        raise TypeError(f"not JSON-serialisable in an audit event: {type(obj).__name__}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=default)


def event_hash(
    *,
    seq: int,
    ts: datetime,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any],
    run_id: str | None,
    prev_hash: str,
) -> str:
    """The sha256 hex digest that chains an event to its predecessor."""
    body = canonical(
        {
            "seq": seq,
            "ts": ts.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": details,
            "run_id": run_id,
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class ChainProblem:
    """The first place where the chain does not hold."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"audit event #{self.seq}: {self.reason}"


@dataclass(frozen=True)
class ChainReport:
    """The result of verifying the chain."""

    events: int
    problem: ChainProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(events: Iterable[Any]) -> ChainReport:
    """Walk events in ``seq`` order; report the first edited, deleted or reordered entry."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for ev in events:
        count += 1
        if ev.seq != expected_seq:
            return ChainReport(
                count, ChainProblem(expected_seq, f"missing (next present entry is #{ev.seq})")
            )
        if ev.prev_hash != prev:
            return ChainReport(count, ChainProblem(ev.seq, "prev_hash does not match entry before"))
        digest = event_hash(
            seq=ev.seq,
            ts=ev.ts,
            actor=ev.actor,
            action=ev.action,
            subject=ev.subject,
            details=ev.details,
            run_id=ev.run_id,
            prev_hash=ev.prev_hash,
        )
        if digest != ev.hash:
            return ChainReport(count, ChainProblem(ev.seq, "content was modified (hash mismatch)"))
        prev = ev.hash
        expected_seq += 1
    return ChainReport(count, None)


def export_lines(events: Iterable[Any]) -> Iterator[str]:
    """JSON Lines, one per event, in chain order."""
    for ev in events:
        yield canonical(
            {
                "seq": ev.seq,
                "ts": ev.ts,
                "actor": ev.actor,
                "action": ev.action,
                "subject": ev.subject,
                "details": ev.details,
                "run_id": ev.run_id,
                "prev_hash": ev.prev_hash,
                "hash": ev.hash,
            }
        )
