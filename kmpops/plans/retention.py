"""Backup retention: which backups and configuration blobs may be deleted, and why.

Pure code, no I/O. The rules, per group of backups of the same kind and subject (a database
name, or a host for configuration backups):

1. A backup younger than its retention (``backups.<kind>.retention``) is kept.
2. An expired backup is deleted only when a *newer verified* backup of the same group exists;
   otherwise it is kept (an old backup is better than none).
3. Hence the newest verified backup of a group is never deleted, whatever its age.
4. A configuration blob is deleted only when no kept manifest references it *and* it is older
   than ``blob_grace`` (a run in flight uploads blobs before it writes its manifest).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

__all__ = [
    "BackupFact",
    "BlobFact",
    "RetentionDecision",
    "RetentionPlan",
    "RetentionPolicy",
    "plan_retention",
]

BackupKind = Literal["database", "configuration"]


@dataclass(frozen=True)
class BackupFact:
    """What the catalog knows about one backup.

    ``verified`` is True (verification passed), False (failed) or None (not verified yet).
    ``blobs`` are the blob keys a configuration manifest references (empty for databases).
    """

    backup_id: str
    kind: BackupKind
    subject: str
    created_at: datetime
    complete: bool = True
    verified: bool | None = None
    blobs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BlobFact:
    """A stored configuration blob and when it was written."""

    key: str
    last_modified: datetime


@dataclass(frozen=True)
class RetentionPolicy:
    """Retention per kind, and the age below which an unreferenced blob is left alone."""

    database: timedelta = timedelta(days=30)
    configuration: timedelta = timedelta(days=7)
    blob_grace: timedelta = timedelta(hours=6)

    def for_kind(self, kind: BackupKind) -> timedelta:
        """The retention of backups of ``kind``."""
        return self.database if kind == "database" else self.configuration


@dataclass(frozen=True)
class RetentionDecision:
    """Keep or delete one backup, with the reason in words an operator reads."""

    backup_id: str
    kind: BackupKind
    subject: str
    created_at: datetime
    action: Literal["keep", "delete"]
    reason: str


@dataclass(frozen=True)
class RetentionPlan:
    """The decisions for every backup, and the configuration blobs that may go."""

    decisions: tuple[RetentionDecision, ...]
    delete_blobs: tuple[str, ...] = ()
    kept_blobs: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def to_delete(self) -> tuple[RetentionDecision, ...]:
        """Decisions whose action is ``delete``."""
        return tuple(d for d in self.decisions if d.action == "delete")

    @property
    def to_keep(self) -> tuple[RetentionDecision, ...]:
        """Decisions whose action is ``keep``."""
        return tuple(d for d in self.decisions if d.action == "keep")

    @property
    def empty(self) -> bool:
        """True when nothing would be deleted."""
        return not self.to_delete and not self.delete_blobs


def _age_text(age: timedelta) -> str:
    hours = age.total_seconds() / 3600
    return f"{hours / 24:.1f}d" if hours >= 48 else f"{hours:.1f}h"


def plan_retention(
    backups: Iterable[BackupFact],
    *,
    now: datetime,
    policy: RetentionPolicy,
    blobs: Iterable[BlobFact] = (),
) -> RetentionPlan:
    """Decide, for each backup and each configuration blob, whether it may be deleted.

    Deterministic: decisions are ordered by (kind, subject, created_at, backup_id). Raises
    ValueError if a datetime is naive (ages across time zones would be silently wrong).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    groups: Mapping[tuple[str, str], list[BackupFact]] = defaultdict(list)
    for fact in backups:
        if fact.created_at.tzinfo is None:
            raise ValueError(f"backup {fact.backup_id}: created_at must be timezone-aware")
        groups[(fact.kind, fact.subject)].append(fact)

    decisions: list[RetentionDecision] = []
    for (_kind, subject), members in sorted(groups.items()):
        members.sort(key=lambda f: (f.created_at, f.backup_id))
        retention = policy.for_kind(members[0].kind)
        verified = [f for f in members if f.complete and f.verified is True]
        for fact in members:
            age = now - fact.created_at
            newer_verified = [v for v in verified if v.created_at > fact.created_at]
            if age <= retention:
                action, reason = (
                    "keep",
                    f"within retention ({_age_text(age)} <= {_age_text(retention)})",
                )
            elif newer_verified:
                action = "delete"
                reason = (
                    f"expired ({_age_text(age)} > {_age_text(retention)}); "
                    f"newer verified backup {newer_verified[-1].backup_id} exists"
                )
            else:
                action = "keep"
                reason = (
                    f"expired ({_age_text(age)} > {_age_text(retention)}) but no newer verified "
                    "backup exists"
                )
                if fact.complete and fact.verified is True:
                    reason += " (last verified backup)"
            decisions.append(
                RetentionDecision(
                    backup_id=fact.backup_id,
                    kind=fact.kind,  # type: ignore[arg-type]
                    subject=subject,
                    created_at=fact.created_at,
                    action=action,  # type: ignore[arg-type]
                    reason=reason,
                )
            )
        if verified:
            last = verified[-1].backup_id
            assert not any(d.backup_id == last and d.action == "delete" for d in decisions), (
                "retention must never delete the last verified backup"
            )

    kept_ids = {d.backup_id for d in decisions if d.action == "keep"}
    referenced: set[str] = set()
    for members in groups.values():
        for fact in members:
            if fact.backup_id in kept_ids:
                referenced.update(fact.blobs)
    delete_blobs: list[str] = []
    kept_blobs = 0
    notes: list[str] = []
    for blob in sorted(blobs, key=lambda b: b.key):
        if blob.key in referenced:
            kept_blobs += 1
        elif now - blob.last_modified < policy.blob_grace:
            kept_blobs += 1
            notes.append(f"{blob.key}: unreferenced but younger than the grace period; kept")
        else:
            delete_blobs.append(blob.key)
    return RetentionPlan(
        decisions=tuple(decisions),
        delete_blobs=tuple(delete_blobs),
        kept_blobs=kept_blobs,
        notes=tuple(notes),
    )
