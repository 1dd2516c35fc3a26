"""Alerting records: evaluator state with notification bookkeeping, and silences.

Functions over a :class:`~kmpops.records.Records` instance (its ``session()``), so the repository
class stays small. The evaluator keeps one row per alert (rule + labelset) in ``alert_states``:
``data`` holds :meth:`AlertState.to_dict` plus a ``notified`` entry (the state last notified and
when), which is what makes notifications one-per-state-change across restarts and lets reminders
follow ``repeat_interval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from kmpops.errors import NotFound
from kmpops.plans.alerts import AlertState, LabelSet
from kmpops.plans.incident import alert_key
from kmpops.records.models import AlertStateRecord, Silence
from kmpops.records.repository import Records

__all__ = [
    "StoredAlert",
    "active_silences",
    "add_silence",
    "delete_alert_states",
    "expire_silence",
    "load_alert_states",
    "matching_silence",
    "save_alert_states",
    "silences",
]


@dataclass
class StoredAlert:
    """One alert as stored: its evaluator state and what was last notified."""

    state: AlertState
    notified_state: str | None = None
    notified_at: datetime | None = None

    @property
    def key(self) -> str:
        """The alert's key (``rule{labels}``)."""
        return alert_key(self.state.rule, self.state.labels)


def _aware(when: datetime | None) -> datetime | None:
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def load_alert_states(rec: Records, rule: str) -> dict[LabelSet, StoredAlert]:
    """The stored alerts of ``rule`` by labelset (empty for a new rule). A row that cannot be
    read back (written by an incompatible version) is skipped, as if the alert were new."""
    out: dict[LabelSet, StoredAlert] = {}
    with rec.session() as s:
        rows = list(s.scalars(select(AlertStateRecord).where(AlertStateRecord.rule == rule)))
    for row in rows:
        data = dict(row.data or {})
        try:
            st = AlertState.from_dict(data)
        except ValueError:
            continue
        notified = data.get("notified") or {}
        at = notified.get("at")
        out[st.labels] = StoredAlert(
            state=st,
            notified_state=notified.get("state"),
            notified_at=_aware(datetime.fromisoformat(at)) if at else None,
        )
    return out


def save_alert_states(rec: Records, rule: str, alerts: Mapping[LabelSet, StoredAlert]) -> None:
    """Replace the stored alerts of ``rule`` with ``alerts`` in one transaction (rows of
    alerts no longer in the map, i.e. dropped pending or expired resolved ones, are deleted)."""
    now = datetime.now(UTC)
    with rec.session() as s:
        rows = {
            r.labels_key: r
            for r in s.scalars(select(AlertStateRecord).where(AlertStateRecord.rule == rule))
        }
        keep = set()
        for stored in alerts.values():
            key = stored.key
            keep.add(key)
            data: dict[str, Any] = stored.state.to_dict()
            data["notified"] = {
                "state": stored.notified_state,
                "at": stored.notified_at.isoformat() if stored.notified_at else None,
            }
            row = rows.get(key)
            if row is None:
                row = AlertStateRecord(rule=rule, labels_key=key, state=stored.state.state)
                s.add(row)
            row.state = stored.state.state
            row.data = data
            row.updated_at = now
            row.last_notified_at = stored.notified_at
        gone = [k for k in rows if k not in keep]
        if gone:
            s.execute(
                delete(AlertStateRecord).where(
                    AlertStateRecord.rule == rule, AlertStateRecord.labels_key.in_(gone)
                )
            )


def delete_alert_states(rec: Records, rule: str | None = None) -> int:
    """Forget the stored alerts of ``rule`` (all rules when None); returns how many rows."""
    with rec.session() as s:
        q = delete(AlertStateRecord)
        if rule is not None:
            q = q.where(AlertStateRecord.rule == rule)
        return int(s.execute(q).rowcount or 0)  # type: ignore[attr-defined]


def add_silence(
    rec: Records,
    *,
    matchers: Mapping[str, str],
    starts_at: datetime,
    ends_at: datetime,
    created_by: str,
    comment: str = "",
) -> Silence:
    """Record a silence: alerts whose labels (``alertname`` = rule name) equal every matcher
    are not notified between ``starts_at`` and ``ends_at``. Raises ValueError for an empty
    matcher set or an end not after the start."""
    if not matchers:
        raise ValueError("a silence needs at least one matcher")
    if _aware(ends_at) <= _aware(starts_at):  # type: ignore[operator]
        raise ValueError("a silence must end after it starts")
    with rec.session() as s:
        row = Silence(
            matchers={str(k): str(v) for k, v in matchers.items()},
            starts_at=starts_at,
            ends_at=ends_at,
            created_by=created_by,
            comment=comment,
        )
        s.add(row)
    return row


def silences(rec: Records) -> list[Silence]:
    """Every silence, oldest first."""
    with rec.session() as s:
        return list(s.scalars(select(Silence).order_by(Silence.id)))


def active_silences(rec: Records, now: datetime) -> list[Silence]:
    """Silences in force at ``now``."""
    now = _aware(now)  # type: ignore[assignment]
    return [
        s
        for s in silences(rec)
        if _aware(s.starts_at) <= now < _aware(s.ends_at)  # type: ignore[operator]
    ]


def expire_silence(rec: Records, silence_id: int, now: datetime) -> Silence:
    """End a silence at ``now`` (kept as a record). NotFound for an unknown id."""
    with rec.session() as s:
        row = s.get(Silence, silence_id)
        if row is None:
            raise NotFound(f"silence #{silence_id}")
        row.ends_at = min(_aware(row.ends_at), _aware(now))  # type: ignore[type-var]
    return row


def matching_silence(
    active: list[Silence], rule: str, labels: Mapping[str, str] | LabelSet
) -> Silence | None:
    """The first of ``active`` silences that matches the alert, else None."""
    values = dict(labels)
    values.setdefault("alertname", rule)
    for sil in active:
        if all(values.get(k) == v for k, v in (sil.matchers or {}).items()):
            return sil
    return None
