"""The anchored audit chain: every event carries an HMAC-SHA256 tag over itself and the tag before.

The key (``records.audit_key``) never lives in the records database, so someone who can write
that database can neither edit an event nor recompute the chain consistently (a chain rebuilt
with plain sha256, or with any other key, fails at its first event). Cutting off the tail leaves
a valid-looking chain, so the head is *checkpointed* — ``(seq, head tag, time)`` signed with the
key — to write-once storage (:mod:`kmpops.records.anchor`): a checkpoint that saw more events
than the records hold is a truncation.

Tags are HMAC-SHA256 over ``"kmpops-audit-event-v1\\n"`` + a canonical JSON encoding (sorted
keys, no whitespace, UTC ISO timestamps) of the event's fields and the previous tag; the first
event's previous tag is :data:`GENESIS`. Checkpoint signatures use the domain
``"kmpops-audit-checkpoint-v1\\n"``, so neither can stand in for the other. The tag is stored in
the ``hash`` column and the previous tag in ``prev_hash`` (the schema is unchanged).

:func:`verify_chain` is pure: events + key + checkpoints in, a :class:`ChainReport` out naming
each problem — ``deletion`` (a gap in ``seq``), ``rewrite`` (a tag that does not match, or a
chain that no longer matches a checkpoint), ``truncation`` (fewer events than a checkpoint saw),
``checkpoint`` (a checkpoint whose signature does not hold) — with the first event concerned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from kmpops.errors import ConfigError

GENESIS = "0" * 64
MIN_KEY_BYTES = 32
_EVENT_DOMAIN = b"kmpops-audit-event-v1\n"
_CHECKPOINT_DOMAIN = b"kmpops-audit-checkpoint-v1\n"
_KEY_ID_DOMAIN = b"kmpops-audit-key-id-v1"

ProblemKind = Literal["deletion", "rewrite", "truncation", "checkpoint", "key"]


class AuditKeyMissing(ConfigError):
    """No ``records.audit_key`` is configured: audit events are neither written nor verified."""


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, compact separators, datetimes as UTC ISO-8601."""

    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return obj.astimezone(UTC).isoformat()
        raise TypeError(f"not JSON-serialisable in an audit event: {type(obj).__name__}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=default)


class AuditKey:
    """The secret that authenticates the chain; its value never appears in repr or str.

    Raises ValueError if the key is shorter than :data:`MIN_KEY_BYTES` bytes (the message says
    how long it is, never what it is).
    """

    __slots__ = ("_key",)

    def __init__(self, value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if len(raw) < MIN_KEY_BYTES:
            raise ValueError(
                f"records.audit_key is too short ({len(raw)} bytes; at least {MIN_KEY_BYTES})"
            )
        self._key = raw

    def mac(self, domain: bytes, body: str) -> str:
        """HMAC-SHA256 (hex) of ``domain + body``."""
        return hmac.new(self._key, domain + body.encode(), hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """A short public fingerprint of the key (says which key signed; reveals nothing)."""
        return hmac.new(self._key, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"AuditKey(id={self.key_id})"

    __str__ = __repr__


def event_body(
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
    """The canonical text an event's tag covers (its fields and the previous tag)."""
    return canonical(
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


def event_mac(key: AuditKey, **fields: Any) -> str:
    """The HMAC-SHA256 tag (hex) that authenticates an event and chains it to its predecessor."""
    return key.mac(_EVENT_DOMAIN, event_body(**fields))


def _tag_of(key: AuditKey, ev: Any) -> str:
    return event_mac(
        key,
        seq=ev.seq,
        ts=ev.ts,
        actor=ev.actor,
        action=ev.action,
        subject=ev.subject,
        details=ev.details,
        run_id=ev.run_id,
        prev_hash=ev.prev_hash,
    )


# -- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The chain head at one moment, signed with the audit key: ``seq`` events, the last tag."""

    seq: int
    mac: str
    ts: datetime
    key_id: str
    reason: str = ""
    sig: str = ""
    where: str = field(default="", compare=False)
    named_seq: int | None = field(default=None, compare=False)

    def _body(self) -> str:
        return canonical(
            {
                "v": 1,
                "seq": self.seq,
                "mac": self.mac,
                "ts": self.ts.astimezone(UTC).isoformat(timespec="microseconds"),
                "key_id": self.key_id,
                "reason": self.reason,
            }
        )

    @classmethod
    def make(cls, key: AuditKey, *, seq: int, mac: str, ts: datetime, reason: str) -> Checkpoint:
        """A checkpoint of the head ``(seq, mac)`` at ``ts``, signed with ``key``."""
        unsigned = cls(seq=seq, mac=mac, ts=ts, key_id=key.key_id, reason=reason[:200])
        return replace(unsigned, sig=key.mac(_CHECKPOINT_DOMAIN, unsigned._body()))

    def signed_by(self, key: AuditKey) -> bool:
        """True if the signature holds under ``key`` (constant-time comparison)."""
        return hmac.compare_digest(self.sig, key.mac(_CHECKPOINT_DOMAIN, self._body()))

    def to_json(self) -> str:
        """One line of JSON: the signed fields and the signature."""
        return canonical({**json.loads(self._body()), "sig": self.sig})

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "") -> Checkpoint:
        """Parse :meth:`to_json` output; ValueError naming ``where`` if it is not a checkpoint."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("v") != 1:
                raise ValueError("not a version-1 checkpoint")
            return cls(
                seq=int(data["seq"]),
                mac=str(data["mac"]),
                ts=datetime.fromisoformat(str(data["ts"])).astimezone(UTC),
                key_id=str(data["key_id"]),
                reason=str(data.get("reason", "")),
                sig=str(data["sig"]),
                where=where,
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"checkpoint {where or '(unnamed)'} is unreadable: {err}") from None

    def describe(self) -> str:
        """``seq N at <time>`` for messages."""
        return f"the checkpoint of {self.ts.isoformat(timespec='seconds')} (seq {self.seq})"


# -- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """One place where the chain does not hold: the first event concerned and why."""

    seq: int
    reason: str
    kind: ProblemKind = "rewrite"

    def __str__(self) -> str:
        return f"audit event #{self.seq}: {self.kind}: {self.reason}"


@dataclass(frozen=True)
class ChainReport:
    """The result of verifying the chain: every problem found, the first one first."""

    events: int
    problems: tuple[ChainProblem, ...] = ()
    checkpoints: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def problem(self) -> ChainProblem | None:
        """The problem at the earliest event (None if the chain holds)."""
        return self.problems[0] if self.problems else None


def verify_chain(
    events: Iterable[Any],
    *,
    key: AuditKey | None,
    checkpoints: Sequence[Checkpoint] = (),
    unreadable: Sequence[str] = (),
) -> ChainReport:
    """Check ``events`` (in ``seq`` order) against ``key`` and the ``checkpoints``.

    Reports, each naming the first event concerned: a gap in ``seq`` (deletion); an event whose
    tag or link does not match (rewrite: changed, or recomputed without the key); a checkpoint
    that saw more events than are present (truncation) or a different head tag at its ``seq``
    (rewrite); a checkpoint whose signature does not hold or that cannot be read. Without a key
    nothing can be verified: one ``key`` problem (fail closed). Pure; reads nothing else.
    """
    rows = list(events)
    if key is None:
        return ChainReport(
            len(rows),
            (
                ChainProblem(
                    1, "records.audit_key is not configured: nothing can be verified", "key"
                ),
            ),
        )
    problems: list[ChainProblem] = []
    tags: dict[int, str] = {0: GENESIS}
    verified = 0  # the chain holds for events 1..verified
    expected, prev = 1, GENESIS
    for ev in rows:
        if ev.seq != expected:
            problems.append(
                ChainProblem(
                    expected,
                    f"missing: deleted (the next present event is #{ev.seq})",
                    "deletion",
                )
            )
            break
        if ev.prev_hash != prev:
            problems.append(
                ChainProblem(ev.seq, f"does not link to event #{ev.seq - 1} (prev tag)", "rewrite")
            )
            break
        if not hmac.compare_digest(str(ev.hash), _tag_of(key, ev)):
            problems.append(
                ChainProblem(
                    ev.seq,
                    "does not match its HMAC tag (changed, or the chain was recomputed "
                    "without the audit key)",
                    "rewrite",
                )
            )
            break
        tags[ev.seq] = ev.hash
        verified = ev.seq
        prev = ev.hash
        expected += 1
    present = max((ev.seq for ev in rows), default=0)

    good: list[Checkpoint] = []
    for cp in checkpoints:
        if cp.key_id != key.key_id or not cp.signed_by(key):
            label = f"checkpoint {cp.where}" if cp.where else cp.describe()
            problems.append(
                ChainProblem(
                    max(cp.seq, 1),
                    f"{label} has a bad signature (forged, or signed with another key: "
                    f"{cp.key_id})",
                    "checkpoint",
                )
            )
        elif cp.named_seq is not None and cp.named_seq != cp.seq:
            problems.append(
                ChainProblem(
                    max(cp.seq, 1),
                    f"checkpoint {cp.where} (seq {cp.seq}) is stored under the name of seq "
                    f"{cp.named_seq}: a copy",
                    "checkpoint",
                )
            )
        else:
            good.append(cp)
    problems += [ChainProblem(1, f"{what}", "checkpoint") for what in unreadable]

    newest = max(good, key=lambda c: (c.seq, c.ts), default=None)
    if newest is not None and newest.seq > present:
        problems.append(
            ChainProblem(
                present + 1,
                f"{newest.describe()} saw {newest.seq} events, the records hold "
                f"{present}; event #{present + 1} is the first missing",
                "truncation",
            )
        )
    matched = 0  # the highest seq a checkpoint confirmed
    for cp in sorted(good, key=lambda c: (c.seq, c.ts)):
        if cp.seq <= verified:
            if hmac.compare_digest(tags[cp.seq], cp.mac):
                matched = max(matched, cp.seq)
            else:
                problems.append(
                    ChainProblem(
                        matched + 1,
                        f"events #{matched + 1}..#{cp.seq} no longer match {cp.describe()} "
                        "(the chain was replaced after it)",
                        "rewrite",
                    )
                )

    notes: list[str] = []
    if newest is None:
        notes.append("no checkpoint yet: a cut-off tail cannot be detected before the first one")
    else:
        if verified > newest.seq:
            notes.append(f"{verified - newest.seq} event(s) after {newest.describe()}")
    first = sorted({(p.seq, i): p for i, p in enumerate(problems)}.items())
    return ChainReport(
        len(rows), tuple(p for _, p in first), checkpoints=len(good), notes=tuple(notes)
    )


def export_lines(events: Iterable[Any], checkpoints: Iterable[Checkpoint] = ()) -> Iterator[str]:
    """JSON Lines: one ``{"type": "event", …}`` per event in chain order, then one
    ``{"type": "checkpoint", …}`` per checkpoint (with where it is stored)."""
    for ev in events:
        yield canonical(
            {
                "type": "event",
                "seq": ev.seq,
                "ts": ev.ts,
                "actor": ev.actor,
                "action": ev.action,
                "subject": ev.subject,
                "details": ev.details,
                "run_id": ev.run_id,
                "prev_mac": ev.prev_hash,
                "mac": ev.hash,
            }
        )
    for cp in sorted(checkpoints, key=lambda c: (c.seq, c.ts)):
        yield canonical({"type": "checkpoint", **json.loads(cp.to_json()), "where": cp.where})
