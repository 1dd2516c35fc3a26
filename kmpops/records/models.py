"""SQLAlchemy 2 models of the records store (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored naive-UTC and always returned timezone-aware (SQLite drops tzinfo)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the records store; use timezone-aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    """Declarative base of every kmp-ops record."""

    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class AuditEvent(Base):
    """One entry of the append-only audit trail.

    ``hash`` holds the event's HMAC-SHA256 tag (keyed with ``records.audit_key``, which is not
    stored here) and ``prev_hash`` the tag of the event before (see kmpops.records.audit).
    """

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(200), index=True)
    subject: Mapped[str] = mapped_column(String(500), index=True)
    details: Mapped[dict[str, Any]]
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Release(Base):
    """A version of a service on one host; ``state`` is current, previous, retired or failed."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(primary_key=True)
    service: Mapped[str] = mapped_column(String(100), index=True)
    environment: Mapped[str] = mapped_column(String(100), index=True)
    host: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20), index=True)
    deployed_at: Mapped[datetime] = mapped_column(default=utcnow)
    deployed_by: Mapped[str] = mapped_column(String(200), default="")
    run_id: Mapped[str | None] = mapped_column(String(64))
    fence: Mapped[int | None]  # the lease's fencing number it was recorded under


class Approval(Base):
    """One approval request and its answer (who, when, what they saw, why)."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(primary_key=True)
    subject: Mapped[str] = mapped_column(String(500), index=True)
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    requested_by: Mapped[str] = mapped_column(String(200), default="")
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    summary: Mapped[str] = mapped_column(Text, default="")
    decision: Mapped[str | None] = mapped_column(String(20))
    approver: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime | None]
    outcome: Mapped[str] = mapped_column(String(20), default="pending")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ChangeRequest(Base):
    """A change request from request to close."""

    __tablename__ = "change_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(500))
    description: Mapped[str] = mapped_column(Text, default="")
    services: Mapped[list[Any]] = mapped_column(default=list)
    environments: Mapped[list[Any]] = mapped_column(default=list)
    implementation_plan: Mapped[str] = mapped_column(Text, default="")
    rollback_plan: Mapped[str] = mapped_column(Text, default="")
    risk: Mapped[str | None] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(30), default="requested")
    requested_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(30))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Backup(Base):
    """A database or configuration backup; complete only after its upload was confirmed."""

    __tablename__ = "backups"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    key: Mapped[str] = mapped_column(String(1000))
    size: Mapped[int | None]
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20), default="running", index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_id: Mapped[str | None] = mapped_column(String(64))
    verification: Mapped[str | None] = mapped_column(String(20))
    verified_at: Mapped[datetime | None]
    fence: Mapped[int | None]  # the lease's fencing number it was catalogued under
    verifications: Mapped[list[Verification]] = relationship(back_populates="backup")


class Verification(Base):
    """The outcome of one verification of one backup, with each check's evidence."""

    __tablename__ = "verifications"

    id: Mapped[int] = mapped_column(primary_key=True)
    backup_id: Mapped[int] = mapped_column(ForeignKey("backups.id"), index=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    ok: Mapped[bool]
    checks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_id: Mapped[str | None] = mapped_column(String(64))
    backup: Mapped[Backup] = relationship(back_populates="verifications")


class Drill(Base):
    """A disaster-recovery drill: measured RTO and RPO against their targets."""

    __tablename__ = "drills"

    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    rto_s: Mapped[float | None] = mapped_column(Float)
    rpo_s: Mapped[float | None] = mapped_column(Float)
    target_rto_s: Mapped[float | None] = mapped_column(Float)
    target_rpo_s: Mapped[float | None] = mapped_column(Float)
    ok: Mapped[bool]
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_id: Mapped[str | None] = mapped_column(String(64))


class Incident(Base):
    """An incident from detection to lessons learned."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(500))
    severity: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(30), default="open", index=True)
    alert_key: Mapped[str | None] = mapped_column(String(500), index=True)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    detected_at: Mapped[datetime | None]
    contained_at: Mapped[datetime | None]
    recovered_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    timeline: Mapped[list[IncidentEvent]] = relationship(
        back_populates="incident", order_by="IncidentEvent.id"
    )


class IncidentEvent(Base):
    """One line of an incident's timeline."""

    __tablename__ = "incident_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    phase: Mapped[str] = mapped_column(String(30))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    incident: Mapped[Incident] = relationship(back_populates="timeline")


class AlertStateRecord(Base):
    """The evaluator's state of one alert (rule + label set), kept across restarts."""

    __tablename__ = "alert_states"
    __table_args__ = (UniqueConstraint("rule", "labels_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rule: Mapped[str] = mapped_column(String(200), index=True)
    labels_key: Mapped[str] = mapped_column(String(1000))
    state: Mapped[str] = mapped_column(String(20))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_notified_at: Mapped[datetime | None]


class Silence(Base):
    """A silence: alerts matching ``matchers`` are not notified between start and end."""

    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(primary_key=True)
    matchers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(200), default="")
    comment: Mapped[str] = mapped_column(Text, default="")


class Lease(Base):
    """The lease on one lock target (``kmpops.locks``): who holds it, since when, until when,
    and the target's fencing number (incremented on every acquire; the row stays after release
    so the number only grows). ``holder`` is None when the target is free; ``holder_name``
    then names the last holder."""

    __tablename__ = "leases"

    target: Mapped[str] = mapped_column(String(300), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), index=True)
    holder_name: Mapped[str] = mapped_column(String(300), default="")
    fence: Mapped[int] = mapped_column(Integer, default=0)
    acquired_at: Mapped[datetime | None]
    renewed_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]


class LeaseGrant(Base):
    """One tenure of a lease: target, fencing number, holder, when it was taken and when it
    ended (None while held) and how (``released``, ``released_dead``: freed for a run known
    dead, ``expired``: taken over after its holder stopped renewing, ``ended_at`` then being
    the expiry it was taken at). Written in the same transaction as the lease row it
    describes, so the history of a target is the exact sequence of who held it."""

    __tablename__ = "lease_grants"
    __table_args__ = (UniqueConstraint("target", "fence"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    target: Mapped[str] = mapped_column(String(300), index=True)
    fence: Mapped[int] = mapped_column(Integer)
    holder: Mapped[str] = mapped_column(String(64), index=True)
    holder_name: Mapped[str] = mapped_column(String(300), default="")
    acquired_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    ended_how: Mapped[str] = mapped_column(String(20), default="")


class Consumption(Base):
    """A one-time use: a change request spent on one service/environment, an approval answer
    spent on one request. The unique key is what makes a second use fail (in the database,
    so two runs racing for it cannot both win)."""

    __tablename__ = "consumptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(300), unique=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    run_id: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class PackageChangeRecord(Base):
    """One package on one host in one patch-hosts run: the version before, the target, the
    version read back after, and the outcome (``installed``, ``failed``, ``reverted``,
    ``revert_failed``, ``flagged``)."""

    __tablename__ = "package_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    environment: Mapped[str] = mapped_column(String(100), index=True)
    host: Mapped[str] = mapped_column(String(100), index=True)
    package: Mapped[str] = mapped_column(String(200), index=True)
    from_version: Mapped[str | None] = mapped_column(String(200))
    to_version: Mapped[str] = mapped_column(String(200))
    after_version: Mapped[str | None] = mapped_column(String(200))
    security: Mapped[bool] = mapped_column(default=False)
    outcome: Mapped[str] = mapped_column(String(20), index=True)
    batch: Mapped[str] = mapped_column(String(100), default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class PendingUpdateRecord(Base):
    """A pending update kmp-ops saw on a host: when first and last (a patch's age, where its
    repository's Release date is unknown)."""

    __tablename__ = "pending_updates"
    __table_args__ = (UniqueConstraint("host", "package", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    environment: Mapped[str] = mapped_column(String(100))
    host: Mapped[str] = mapped_column(String(100), index=True)
    package: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    security: Mapped[bool] = mapped_column(default=False)
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
