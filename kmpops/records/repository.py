"""The records repository: one small API over the SQLAlchemy models.

``Records(url)`` is lazy; ``migrate()`` brings the schema to the newest Alembic revision. Every
write is one transaction; audit events are appended with a retry if another writer took the same
sequence number, so the chain never forks. Details written to the audit chain pass through the log
redactor: secrets never land there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kmpops import locks as lock_rules
from kmpops.config import OpsConfig
from kmpops.errors import ConfigError, IntegrityError, KmpOpsError, NotFound
from kmpops.locks import Fence, LeaseLost, LeaseView
from kmpops.records.anchor import CheckpointStore, open_checkpoint_store
from kmpops.records.audit import (
    GENESIS,
    AuditKey,
    AuditKeyMissing,
    ChainReport,
    Checkpoint,
    event_mac,
    export_lines,
    verify_chain,
)
from kmpops.records.models import (
    AlertStateRecord,
    Approval,
    AuditEvent,
    Backup,
    Base,
    ChangeRequest,
    Consumption,
    Drill,
    Incident,
    IncidentEvent,
    Lease,
    LeaseGrant,
    PackageChangeRecord,
    PendingUpdateRecord,
    Release,
    Verification,
    utcnow,
)
from kmpops.secrets import BlockLoader, resolve_secret

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_Row = TypeVar("_Row", bound=Base)
_MIGRATE_LOCK = threading.Lock()
_KEY_LOCK = threading.Lock()
VERIFY_CHECKPOINTS = 200  # verify reads at most this many of the newest checkpoints


def _redact_details(details: dict[str, Any]) -> dict[str, Any]:
    try:
        from kmpops.redact import get_redactor
    except ImportError:
        return details
    redactor = get_redactor()

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return redactor.redact(value)
        if isinstance(value, dict):
            return {str(k): walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        return value

    return walk(details)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


class Records:
    """The records store at ``url`` (``sqlite:///path`` or ``postgresql+psycopg://…``)."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        audit_key: AuditKey | Callable[[], AuditKey | None] | None = None,
        checkpoints: CheckpointStore | Callable[[], CheckpointStore | None] | None = None,
    ) -> None:
        self.url = url
        self._echo = echo
        self._audit_key = audit_key
        self._checkpoints = checkpoints
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created on first use."""
        if self._engine is None:
            if self.url.startswith("sqlite:///"):
                db_path = Path(self.url.removeprefix("sqlite:///"))
                if str(db_path) not in ("", ":memory:"):
                    db_path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(self.url, echo=self._echo, pool_pre_ping=True)
            if engine.dialect.name == "sqlite":

                @event.listens_for(engine, "connect")
                def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA busy_timeout=30000")
                    cur.execute("PRAGMA foreign_keys=ON")
                    cur.close()

            self._engine = engine
            self._sessions = sessionmaker(engine, expire_on_commit=False)
        return self._engine

    def close(self) -> None:
        """Dispose of the connection pool."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        _ = self.engine
        assert self._sessions is not None
        with self._sessions() as session, session.begin():
            yield session

    # -- generic row helpers ----------------------------------------------------------------

    def _add(self, model: type[_Row], **fields: Any) -> _Row:
        with self.session() as s:
            row = model(**fields)
            s.add(row)
        return row

    def _update(self, model: type[_Row], row_id: int, what: str, **fields: Any) -> _Row:
        with self.session() as s:
            row = s.get(model, row_id)
            if row is None:
                raise NotFound(f"{what} #{row_id}")
            for key, value in fields.items():
                setattr(row, key, value)
        return row

    def _get(self, model: type[_Row], row_id: int, what: str) -> _Row:
        with self.session() as s:
            row = s.get(model, row_id)
        if row is None:
            raise NotFound(f"{what} #{row_id}")
        return row

    # -- schema -------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Upgrade the schema to the newest Alembic revision (idempotent).

        Alembic keeps its migration context in module globals, so migrations in one process are
        serialised; concurrent processes are serialised by the database itself.
        """
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with _MIGRATE_LOCK, self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- audit chain ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: OpsConfig, *, block_loader: BlockLoader | None = None) -> Records:
        """The records store ``cfg.records`` describes, with its audit key and checkpoint store.

        Both are resolved on first use (never at construction), so a store that only reads
        releases does not need them; secrets resolved here are registered with the redactor.
        """

        def load_key() -> AuditKey | None:
            ref = cfg.records.audit_key
            if ref is None:
                return None
            try:
                return AuditKey(resolve_secret(ref, block_loader=block_loader))
            except ValueError as err:
                raise ConfigError([str(err)]) from None

        def load_store() -> CheckpointStore | None:
            return open_checkpoint_store(
                cfg, lambda ref: resolve_secret(ref, block_loader=block_loader)
            )

        return cls(cfg.records.url, audit_key=load_key, checkpoints=load_store)

    def _key(self) -> AuditKey:
        with _KEY_LOCK:
            if callable(self._audit_key):
                self._audit_key = self._audit_key()
        if self._audit_key is None:
            raise AuditKeyMissing(
                [
                    "records.audit_key is not configured: kmp-ops refuses to write or verify "
                    "unauthenticated audit events (set it to file:/path or env:NAME)"
                ]
            )
        return self._audit_key

    def checkpoint_store(self) -> CheckpointStore | None:
        """The write-once store the chain head is anchored in (None if none is configured)."""
        with _KEY_LOCK:
            if callable(self._checkpoints):
                self._checkpoints = self._checkpoints()
        return self._checkpoints

    def audit(
        self,
        *,
        actor: str,
        action: str,
        subject: str,
        details: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> AuditEvent:
        """Append one event to the chain (secrets redacted, HMAC-tagged) and return it.

        Raises AuditKeyMissing (a ConfigError) and writes nothing when no audit key is
        configured: the trail fails closed.
        """
        key = self._key()
        clean = _redact_details(_jsonable(details or {}))
        for attempt in range(50):
            try:
                with self.session() as s:
                    last = s.execute(
                        select(AuditEvent.seq, AuditEvent.hash)
                        .order_by(AuditEvent.seq.desc())
                        .limit(1)
                    ).first()
                    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                    ts = utcnow()
                    ev = AuditEvent(
                        seq=seq,
                        ts=ts,
                        actor=actor,
                        action=action,
                        subject=subject,
                        details=clean,
                        run_id=run_id,
                        prev_hash=prev,
                        hash=event_mac(
                            key,
                            seq=seq,
                            ts=ts,
                            actor=actor,
                            action=action,
                            subject=subject,
                            details=clean,
                            run_id=run_id,
                            prev_hash=prev,
                        ),
                    )
                    s.add(ev)
                return ev
            except (SAIntegrityError, OperationalError):
                # another writer appended first (or SQLite was busy): re-read the head and retry
                time.sleep(0.01 * (attempt + 1))
        raise RuntimeError("could not append to the audit chain after 50 attempts")

    def audit_events(
        self, *, subject: str | None = None, action: str | None = None, run_id: str | None = None
    ) -> list[AuditEvent]:
        """Audit events in chain order, optionally filtered."""
        q = select(AuditEvent).order_by(AuditEvent.seq)
        if subject is not None:
            q = q.where(AuditEvent.subject == subject)
        if action is not None:
            q = q.where(AuditEvent.action == action)
        if run_id is not None:
            q = q.where(AuditEvent.run_id == run_id)
        with self.session() as s:
            return list(s.scalars(q))

    def audit_checkpoints(self) -> tuple[list[Checkpoint], list[str]]:
        """Every stored checkpoint, and a message per unreadable one (none without a store).

        Raises ConnectorError/StorageUnavailable if the store cannot be read.
        """
        store = self.checkpoint_store()
        return store.read() if store is not None else ([], [])

    def verify_audit(self) -> ChainReport:
        """Verify the chain against the audit key and the checkpoints (see ``verify_chain``).

        Fails closed: no key, or a checkpoint store that cannot be read, is a problem.
        """
        with self.session() as s:
            events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        try:
            key: AuditKey | None = self._key()
        except AuditKeyMissing:
            key = None
        notes: list[str] = []
        try:
            store = self.checkpoint_store()
            found, bad = store.read(limit=VERIFY_CHECKPOINTS) if store is not None else ([], [])
        except KmpOpsError as err:
            found, bad = [], [f"the checkpoints cannot be read: {err}"]
            store = None
        if store is None and not bad:
            notes.append("no checkpoint store configured (records.checkpoints)")
        report = verify_chain(events, key=key, checkpoints=found, unreadable=bad)
        if store is not None:
            newest = " (the newest)" if len(found) + len(bad) >= VERIFY_CHECKPOINTS else ""
            notes.append(f"{len(found) + len(bad)} checkpoints{newest} read from {store.where}")
        return replace(report, notes=report.notes + tuple(notes))

    def checkpoint_audit(self, reason: str) -> tuple[Checkpoint, str]:
        """Anchor the chain head: verify the chain, then write a signed checkpoint of its head.

        Returns the checkpoint and where it was stored. Raises AuditKeyMissing without a key,
        ConfigError without a checkpoint store, IntegrityError (and writes nothing) if the chain
        does not verify — anchoring a broken chain would bless it — and ConnectorError /
        StorageUnavailable if the store refuses. Idempotent in effect: a second checkpoint of the
        same head is harmless.
        """
        key = self._key()
        store = self.checkpoint_store()
        if store is None:
            raise ConfigError(["records.checkpoints: no checkpoint store is configured"])
        report = self.verify_audit()
        if not report.ok:
            raise IntegrityError(f"audit chain not anchored: {report.problem}")
        with self.session() as s:
            head = s.execute(
                select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
            ).first()
        seq, mac = (head[0], head[1]) if head else (0, GENESIS)
        checkpoint = Checkpoint.make(key, seq=seq, mac=mac, ts=utcnow(), reason=reason)
        where = store.write(checkpoint)
        return replace(checkpoint, where=where), where

    def export_audit(self) -> Iterator[str]:
        """The chain as JSON Lines: every event, then every checkpoint.

        Raises ConnectorError/StorageUnavailable if the checkpoints cannot be read.
        """
        with self.session() as s:
            events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        found, _ = self.audit_checkpoints()
        return export_lines(events, found)

    # -- releases -------------------------------------------------------------------------------

    def record_release(
        self,
        *,
        service: str,
        environment: str,
        host: str,
        version: str,
        sha256: str | None = None,
        deployed_by: str = "",
        run_id: str | None = None,
        fence: Fence | None = None,
    ) -> Release:
        """Make ``version`` current on a host: the old current becomes previous, older retired.

        With ``fence`` (the lease the run holds on the service in the environment) the write
        is refused with LeaseLost, changing nothing, unless that lease is still live."""
        with self.session() as s:
            fence_number = self._check_fence(s, fence)
            rows = s.scalars(
                select(Release).where(
                    Release.service == service,
                    Release.environment == environment,
                    Release.host == host,
                    Release.state.in_(("current", "previous")),
                )
            ).all()
            for row in rows:
                if row.state == "previous":
                    row.state = "retired"
            for row in rows:
                if row.state == "current":
                    row.state = "previous" if row.version != version else "retired"
            rel = Release(
                service=service,
                environment=environment,
                host=host,
                version=version,
                sha256=sha256,
                state="current",
                deployed_by=deployed_by,
                run_id=run_id,
                fence=fence_number,
            )
            s.add(rel)
        return rel

    def flag_release(
        self,
        *,
        service: str,
        environment: str,
        host: str,
        version: str,
        state: str,
        run_id: str | None = None,
    ) -> Release:
        """Record a release that is neither current nor previous (``failed``,
        ``rollback_failed``): the host needs a human; current/previous are left unchanged."""
        return self._add(
            Release,
            service=service,
            environment=environment,
            host=host,
            version=version,
            state=state,
            run_id=run_id,
        )

    def flagged_releases(self, state: str = "rollback_failed") -> list[Release]:
        """Releases flagged with ``state``, newest first."""
        with self.session() as s:
            return list(
                s.scalars(select(Release).where(Release.state == state).order_by(Release.id.desc()))
            )

    def current_release(self, service: str, environment: str, host: str) -> Release | None:
        """The current release of ``service`` on ``host``, or None for a first install."""
        return self._release(service, environment, host, "current")

    def previous_release(self, service: str, environment: str, host: str) -> Release | None:
        """The release before the current one, or None."""
        return self._release(service, environment, host, "previous")

    def _release(self, service: str, environment: str, host: str, state: str) -> Release | None:
        with self.session() as s:
            return s.scalars(
                select(Release)
                .where(
                    Release.service == service,
                    Release.environment == environment,
                    Release.host == host,
                    Release.state == state,
                )
                .order_by(Release.id.desc())
                .limit(1)
            ).first()

    def releases(self, service: str, environment: str | None = None) -> list[Release]:
        """Every release record of a service (newest first)."""
        q = select(Release).where(Release.service == service).order_by(Release.id.desc())
        if environment is not None:
            q = q.where(Release.environment == environment)
        with self.session() as s:
            return list(s.scalars(q))

    # -- approvals --------------------------------------------------------------------------

    def add_approval(self, **fields: Any) -> Approval:
        """Record an approval request or answer; returns the stored row."""
        return self._add(Approval, **fields)

    def update_approval(self, approval_id: int, **fields: Any) -> Approval:
        """Record the answer to an approval request."""
        return self._update(Approval, approval_id, "approval", **fields)

    def approvals(self, *, subject: str | None = None, run_id: str | None = None) -> list[Approval]:
        """Approvals in the order they were asked for."""
        q = select(Approval).order_by(Approval.id)
        if subject is not None:
            q = q.where(Approval.subject == subject)
        if run_id is not None:
            q = q.where(Approval.run_id == run_id)
        with self.session() as s:
            return list(s.scalars(q))

    # -- change requests ------------------------------------------------------------------

    def add_change_request(self, **fields: Any) -> ChangeRequest:
        """Open a change request."""
        return self._add(ChangeRequest, **fields)

    def update_change_request(self, cr_id: int, **fields: Any) -> ChangeRequest:
        """Change a change request's state/outcome."""
        return self._update(ChangeRequest, cr_id, "change request", **fields)

    def change_request(self, cr_id: int) -> ChangeRequest:
        """The change request ``cr_id``; NotFound otherwise."""
        return self._get(ChangeRequest, cr_id, "change request")

    def change_requests(self, *, states: Sequence[str] = ()) -> list[ChangeRequest]:
        """Change requests (oldest first), optionally only those in ``states``."""
        q = select(ChangeRequest).order_by(ChangeRequest.id)
        if states:
            q = q.where(ChangeRequest.state.in_(list(states)))
        with self.session() as s:
            return list(s.scalars(q))

    # -- one-time uses -------------------------------------------------------------------

    def consume(
        self, key: str, *, kind: str, run_id: str | None, details: dict[str, Any] | None = None
    ) -> bool:
        """Spend ``key`` once: True for the first use, False if it was already spent (the
        database's unique key decides, so concurrent runs cannot both win)."""
        try:
            self._add(
                Consumption,
                key=key,
                kind=kind,
                run_id=run_id,
                details=_jsonable(details or {}),
            )
        except SAIntegrityError:
            return False
        return True

    def consumption(self, key: str) -> Consumption | None:
        """The record of ``key``'s use, or None if it was never spent."""
        with self.session() as s:
            return s.scalars(select(Consumption).where(Consumption.key == key)).first()

    def consumptions(self, *, kind: str | None = None, prefix: str = "") -> list[Consumption]:
        """Spent keys (oldest first), optionally of one kind and/or starting with ``prefix``."""
        q = select(Consumption).order_by(Consumption.id)
        if kind is not None:
            q = q.where(Consumption.kind == kind)
        if prefix:
            q = q.where(Consumption.key.startswith(prefix, autoescape=True))
        with self.session() as s:
            return list(s.scalars(q))

    # -- packages ---------------------------------------------------------------------------

    def record_package_change(
        self,
        *,
        run_id: str | None,
        environment: str,
        host: str,
        package: str,
        from_version: str | None,
        to_version: str,
        after_version: str | None,
        outcome: str,
        security: bool = False,
        batch: str = "",
        actor: str = "",
        details: dict[str, Any] | None = None,
    ) -> PackageChangeRecord:
        """Record what one package did on one host in a patch run (one row per outcome: an
        installed-then-reverted package has both rows)."""
        return self._add(
            PackageChangeRecord,
            run_id=run_id,
            environment=environment,
            host=host,
            package=package,
            from_version=from_version,
            to_version=to_version,
            after_version=after_version,
            outcome=outcome,
            security=security,
            batch=batch,
            actor=actor,
            details=_jsonable(details or {}),
        )

    def package_changes(
        self, *, run_id: str | None = None, host: str | None = None
    ) -> list[PackageChangeRecord]:
        """Recorded package changes, oldest first, optionally of one run and/or host."""
        q = select(PackageChangeRecord).order_by(PackageChangeRecord.id)
        if run_id is not None:
            q = q.where(PackageChangeRecord.run_id == run_id)
        if host is not None:
            q = q.where(PackageChangeRecord.host == host)
        with self.session() as s:
            return list(s.scalars(q))

    def observe_pending_updates(
        self,
        *,
        environment: str,
        host: str,
        updates: Sequence[tuple[str, str, bool]],
        at: datetime,
    ) -> dict[tuple[str, str], datetime]:
        """Note the pending updates ``(package, version, security)`` of ``host`` seen ``at``;
        returns (package, version) -> when each was first seen (idempotent; a concurrent
        observer of the same update loses the insert and reads the winner's row)."""
        first: dict[tuple[str, str], datetime] = {}
        for package, version, security in updates:
            for _attempt in range(2):
                try:
                    with self.session() as s:
                        row = s.scalars(
                            select(PendingUpdateRecord).where(
                                PendingUpdateRecord.host == host,
                                PendingUpdateRecord.package == package,
                                PendingUpdateRecord.version == version,
                            )
                        ).first()
                        if row is None:
                            row = PendingUpdateRecord(
                                environment=environment,
                                host=host,
                                package=package,
                                version=version,
                                security=security,
                                first_seen=at,
                                last_seen=at,
                            )
                            s.add(row)
                        else:
                            row.last_seen = max(row.last_seen, at)
                        first[(package, version)] = row.first_seen
                    break
                except SAIntegrityError:
                    continue
        return first

    def pending_first_seen(self, host: str | None = None) -> dict[tuple[str, str, str], datetime]:
        """(host, package, version) -> first seen, for every pending update observed."""
        q = select(PendingUpdateRecord)
        if host is not None:
            q = q.where(PendingUpdateRecord.host == host)
        with self.session() as s:
            return {(r.host, r.package, r.version): r.first_seen for r in s.scalars(q)}

    # -- backups ----------------------------------------------------------------------------

    def start_backup(
        self,
        *,
        kind: str,
        name: str,
        key: str,
        run_id: str | None = None,
        fence: Fence | None = None,
    ) -> Backup:
        """Catalog a backup as running (never complete before its upload is confirmed);
        with ``fence`` refused (LeaseLost, nothing written) unless that lease is live."""
        with self.session() as s:
            number = self._check_fence(s, fence)
            row = Backup(
                kind=kind, name=name, key=key, state="running", run_id=run_id, fence=number
            )
            s.add(row)
        return row

    def finish_backup(
        self,
        backup_id: int,
        *,
        state: str,
        size: int | None = None,
        sha256: str | None = None,
        manifest: dict[str, Any] | None = None,
        fence: Fence | None = None,
    ) -> Backup:
        """Mark a backup complete (after confirmed upload) or failed; with ``fence``, marking
        it complete is refused (LeaseLost, the row stays as it was) unless that lease is live."""
        with self.session() as s:
            if state == "complete":
                self._check_fence(s, fence)
            row = s.get(Backup, backup_id)
            if row is None:
                raise NotFound(f"backup #{backup_id}")
            row.state = state
            row.finished_at = utcnow()
            if size is not None:
                row.size = size
            if sha256 is not None:
                row.sha256 = sha256
            if manifest is not None:
                row.manifest = _jsonable(manifest)
        return row

    def update_backup(self, backup_id: int, **fields: Any) -> Backup:
        """Change fields of a backup record."""
        return self._update(Backup, backup_id, "backup", **fields)

    def backup(self, backup_id: int) -> Backup:
        """The backup ``backup_id``; NotFound otherwise."""
        return self._get(Backup, backup_id, "backup")

    def backups(
        self, *, kind: str | None = None, name: str | None = None, states: Sequence[str] = ()
    ) -> list[Backup]:
        """Backups, newest first."""
        q = select(Backup).order_by(Backup.started_at.desc(), Backup.id.desc())
        if kind is not None:
            q = q.where(Backup.kind == kind)
        if name is not None:
            q = q.where(Backup.name == name)
        if states:
            q = q.where(Backup.state.in_(tuple(states)))
        with self.session() as s:
            return list(s.scalars(q))

    def add_verification(
        self, backup_id: int, *, ok: bool, checks: dict[str, Any], run_id: str | None = None
    ) -> Verification:
        """Record a verification and stamp the backup verified/failed."""
        with self.session() as s:
            row = Verification(backup_id=backup_id, ok=ok, checks=_jsonable(checks), run_id=run_id)
            s.add(row)
            backup = s.get(Backup, backup_id)
            if backup is None:
                raise NotFound(f"backup #{backup_id}")
            backup.verification = "verified" if ok else "failed"
            backup.verified_at = utcnow()
        return row

    def add_drill(self, **fields: Any) -> Drill:
        """Record a DR drill."""
        return self._add(Drill, **fields)

    def drills(self, limit: int = 20) -> list[Drill]:
        """The newest drills first."""
        with self.session() as s:
            return list(s.scalars(select(Drill).order_by(Drill.id.desc()).limit(limit)))

    # -- incidents ------------------------------------------------------------------------

    def open_incident(
        self,
        *,
        title: str,
        severity: str,
        alert_key: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> tuple[Incident, bool]:
        """Open an incident, or return the open one already attached to ``alert_key``.

        Returns (incident, created). A duplicate alert adds a line to the existing timeline.
        """
        with self.session() as s:
            if alert_key is not None:
                existing = s.scalars(
                    select(Incident)
                    .where(Incident.alert_key == alert_key, Incident.state != "closed")
                    .order_by(Incident.id.desc())
                    .limit(1)
                ).first()
                if existing is not None:
                    s.add(
                        IncidentEvent(
                            incident_id=existing.id,
                            phase="detection",
                            message=f"duplicate alert {alert_key} attached",
                            details=_jsonable(details or {}),
                        )
                    )
                    return existing, False
            row = Incident(
                title=title,
                severity=severity,
                alert_key=alert_key,
                detected_at=utcnow(),
                details=_jsonable(details or {}),
            )
            s.add(row)
            s.flush()
            s.add(IncidentEvent(incident_id=row.id, phase="detection", message=f"opened: {title}"))
        return row, True

    def incident_event(
        self, incident_id: int, *, phase: str, message: str, details: dict[str, Any] | None = None
    ) -> IncidentEvent:
        """Add a line to an incident's timeline."""
        with self.session() as s:
            row = IncidentEvent(
                incident_id=incident_id,
                phase=phase,
                message=message,
                details=_jsonable(details or {}),
            )
            s.add(row)
        return row

    def update_incident(self, incident_id: int, **fields: Any) -> Incident:
        """Change an incident's state or timestamps."""
        return self._update(Incident, incident_id, "incident", **fields)

    def claim_incident(self, incident_id: int) -> bool:
        """Move an ``open`` incident to ``responding``, once: True for the one caller that did
        (the response that runs it), False if it was already claimed, closed or is unknown."""
        from sqlalchemy import update

        with self.session() as s:
            result = s.execute(
                update(Incident)
                .where(Incident.id == incident_id, Incident.state == "open")
                .values(state="responding")
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def incident(self, incident_id: int) -> tuple[Incident, list[IncidentEvent]]:
        """An incident and its timeline."""
        with self.session() as s:
            row = s.get(Incident, incident_id)
            if row is None:
                raise NotFound(f"incident #{incident_id}")
            events = list(
                s.scalars(
                    select(IncidentEvent)
                    .where(IncidentEvent.incident_id == incident_id)
                    .order_by(IncidentEvent.id)
                )
            )
        return row, events

    def incidents(self, *, states: Sequence[str] = ()) -> list[Incident]:
        """Incidents, newest first."""
        q = select(Incident).order_by(Incident.id.desc())
        if states:
            q = q.where(Incident.state.in_(tuple(states)))
        with self.session() as s:
            return list(s.scalars(q))

    # -- alert states ------------------------------------------------------------------------

    def alert_states(self, rule: str | None = None) -> list[AlertStateRecord]:
        """Stored alert states (all rules, or one)."""
        q = select(AlertStateRecord).order_by(AlertStateRecord.id)
        if rule is not None:
            q = q.where(AlertStateRecord.rule == rule)
        with self.session() as s:
            return list(s.scalars(q))

    def save_alert_state(
        self,
        *,
        rule: str,
        labels_key: str,
        state: str,
        data: dict[str, Any],
        notified: bool = False,
    ) -> AlertStateRecord:
        """Insert or update the state of one alert; ``notified`` stamps last_notified_at."""
        with self.session() as s:
            row = s.scalars(
                select(AlertStateRecord).where(
                    AlertStateRecord.rule == rule, AlertStateRecord.labels_key == labels_key
                )
            ).first()
            if row is None:
                row = AlertStateRecord(rule=rule, labels_key=labels_key, state=state)
                s.add(row)
            row.state = state
            row.data = _jsonable(data)
            row.updated_at = utcnow()
            if notified:
                row.last_notified_at = utcnow()
        return row

    # -- leases (target locks, kmpops.locks) ------------------------------------------------

    def acquire_leases(
        self,
        targets: Sequence[str],
        *,
        holder: str,
        holder_name: str,
        ttl_seconds: float,
        take_from: str | None = None,
    ) -> tuple[list[Fence], LeaseView | None]:
        """Take ``targets`` for run ``holder``, in the order given (sorted by the caller), in one
        transaction: stop at the first one another live run holds.

        Returns (the fences taken, in order; the busy lease or None when all were taken). The
        rows are created free if missing, then read and locked (PostgreSQL ``FOR UPDATE`` in
        target order; on SQLite the insert already holds the database's write lock), decided
        with :func:`kmpops.locks.decide_acquire`, and taken by conditional UPDATEs whose
        predicate repeats the decision, so of two processes racing for a free or expired
        target exactly one wins. A target this run already holds is extended under its number;
        every other take increments the fencing number. ``take_from`` names a run known dead
        whose live leases may be taken (deploy-recover).
        """
        if not targets:
            return [], None
        with self.session() as s:
            self._ensure_lease_rows(s, targets)
            rows = {
                r.target: r
                for r in s.scalars(
                    select(Lease)
                    .where(Lease.target.in_(list(targets)))
                    .order_by(Lease.target)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                )
            }
            now = utcnow()
            take, extend, busy = [], [], None
            ended: dict[str, tuple[datetime, str]] = {}  # previous tenures this take ends
            for target in targets:
                row = rows[target]
                decision = lock_rules.decide_acquire(
                    _lease_view(row), me=holder, now=now, take_from=take_from
                )
                if decision is lock_rules.AcquireDecision.BUSY:
                    busy = _lease_view(row)
                    break
                if decision is lock_rules.AcquireDecision.TAKE_EXPIRED:
                    ended[target] = (row.expires_at or now, "expired")
                elif decision is lock_rules.AcquireDecision.TAKE_FROM_DEAD:
                    ended[target] = (now, "released_dead")
                (extend if decision is lock_rules.AcquireDecision.ALREADY_HELD else take).append(
                    target
                )
            until = lock_rules.expiry(now, ttl_seconds)
            if take:
                free = or_(
                    Lease.holder.is_(None),
                    Lease.expires_at.is_(None),
                    Lease.expires_at <= now,
                    *([Lease.holder == take_from] if take_from is not None else []),
                )
                done = s.execute(
                    update(Lease)
                    .where(Lease.target.in_(take), free)
                    .values(
                        holder=holder,
                        holder_name=holder_name[:300],
                        fence=Lease.fence + 1,
                        acquired_at=now,
                        renewed_at=now,
                        expires_at=until,
                    )
                    .execution_options(synchronize_session=False)
                )
                if done.rowcount != len(take):  # the rows are locked: cannot happen
                    raise RuntimeError(f"lease rows changed under their lock: {take}")
                for target, (end, how) in ended.items():
                    self._end_grants(s, [target], end, how)
            if extend:
                s.execute(
                    update(Lease)
                    .where(Lease.target.in_(extend), Lease.holder == holder)
                    .values(expires_at=until, renewed_at=now)
                    .execution_options(synchronize_session=False)
                )
            numbers = dict(
                s.execute(
                    select(Lease.target, Lease.fence).where(Lease.target.in_(take + extend))
                ).all()
            )
            s.add_all(
                LeaseGrant(
                    target=t,
                    fence=numbers[t],
                    holder=holder,
                    holder_name=holder_name[:300],
                    acquired_at=now,
                    ended_how="",
                )
                for t in take
            )
        won = [Fence(target=t, holder=holder, number=numbers[t]) for t in targets if t in numbers]
        return won, busy

    @staticmethod
    def _ensure_lease_rows(session: Session, targets: Sequence[str]) -> None:
        if not targets:
            return
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:  # pragma: no cover - the records store is SQLite or PostgreSQL
            raise ConfigError([f"records.url: leases need SQLite or PostgreSQL, not {dialect}"])
        rows = [{"target": t, "holder": None, "holder_name": "", "fence": 0} for t in targets]
        session.execute(
            dialect_insert(Lease).values(rows).on_conflict_do_nothing(index_elements=["target"])
        )

    def renew_leases(self, fences: Sequence[Fence], *, ttl_seconds: float) -> list[Fence]:
        """Extend the leases among ``fences`` that are still this holder's under that number
        by ``ttl_seconds`` (one UPDATE); returns the ones released or taken over (not
        extended).

        A renewal that comes after expiry still extends a lease nobody took meanwhile: the
        unchanged fencing number proves no other run acted on the target in between (writes
        made while it was expired were refused)."""
        if not fences:
            return []
        key = tuple_(Lease.target, Lease.fence, Lease.holder)
        triples = [(f.target, f.number, f.holder) for f in fences]
        with self.session() as s:
            now = utcnow()
            done = s.execute(
                update(Lease)
                .where(key.in_(triples))
                .values(expires_at=lock_rules.expiry(now, ttl_seconds), renewed_at=now)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount == len(fences):
                return []
            kept = set(
                s.execute(select(Lease.target, Lease.fence, Lease.holder).where(key.in_(triples)))
                .tuples()
                .all()
            )
        return [f for f in fences if (f.target, f.number, f.holder) not in kept]

    def release_leases(self, fences: Sequence[Fence]) -> list[str]:
        """Free the leases among ``fences`` that are still this holder's under that number
        (a lease taken over meanwhile is left to its new holder); returns the targets freed."""
        if not fences:
            return []
        key = tuple_(Lease.target, Lease.fence, Lease.holder)
        triples = [(f.target, f.number, f.holder) for f in fences]
        with self.session() as s:
            held = set(
                s.execute(select(Lease.target).where(key.in_(triples)).with_for_update()).scalars()
            )
            if held:
                s.execute(
                    update(Lease)
                    .where(key.in_(triples))
                    .values(holder=None, expires_at=None)  # the name stays: the last holder
                    .execution_options(synchronize_session=False)
                )
                self._end_grants(s, sorted(held), utcnow(), "released")
        return [f.target for f in fences if f.target in held]

    def release_leases_of(self, holder: str) -> list[LeaseView]:
        """Free every lease run ``holder`` holds (deploy-recover, for a run known dead);
        returns them as they were."""
        with self.session() as s:
            rows = list(s.scalars(select(Lease).where(Lease.holder == holder).with_for_update()))
            held = [_lease_view(r) for r in rows]
            for row in rows:
                row.holder, row.expires_at = None, None
            self._end_grants(s, [r.target for r in rows], utcnow(), "released_dead")
        return held

    @staticmethod
    def _end_grants(session: Session, targets: Sequence[str], at: datetime, how: str) -> None:
        """Inside the transaction that frees or takes over ``targets`` (their lease rows
        locked): close their open tenures in the history."""
        if targets:
            session.execute(
                update(LeaseGrant)
                .where(LeaseGrant.target.in_(list(targets)), LeaseGrant.ended_at.is_(None))
                .values(ended_at=at, ended_how=how)
                .execution_options(synchronize_session=False)
            )

    def lease_history(self, target: str | None = None) -> list[LeaseGrant]:
        """Every tenure of every lease (or of ``target``), by target then fencing number:
        who held it, from when to when (``ended_at`` None: still held) and how it ended."""
        q = select(LeaseGrant).order_by(LeaseGrant.target, LeaseGrant.fence)
        if target is not None:
            q = q.where(LeaseGrant.target == target)
        with self.session() as s:
            return list(s.scalars(q))

    def lease(self, target: str) -> LeaseView | None:
        """The lease row of ``target`` (None: never taken)."""
        with self.session() as s:
            row = s.get(Lease, target)
            return _lease_view(row) if row is not None else None

    def leases(self, *, include_free: bool = False) -> list[LeaseView]:
        """Lease rows by target; only held ones (live or expired) unless ``include_free``."""
        q = select(Lease).order_by(Lease.target)
        if not include_free:
            q = q.where(Lease.holder.is_not(None))
        with self.session() as s:
            return [_lease_view(r) for r in s.scalars(q)]

    @staticmethod
    def _check_fence(session: Session, fence: Fence | None) -> int | None:
        """Inside a write's transaction: lock the lease row and refuse the write unless
        ``fence`` is still its live lease (LeaseLost names why). None: no lease to check."""
        if fence is None:
            return None
        now = utcnow()
        live = session.execute(
            update(Lease)
            .where(
                Lease.target == fence.target,
                Lease.holder == fence.holder,
                Lease.fence == fence.number,
                Lease.expires_at > now,
            )
            .values(renewed_at=Lease.renewed_at)
            .execution_options(synchronize_session=False)
        )
        if live.rowcount != 1:
            row = session.get(Lease, fence.target, populate_existing=True)
            why = lock_rules.fence_refusal(
                _lease_view(row) if row is not None else None, fence, now
            )
            raise LeaseLost(why or f"write refused: the lease on {fence.target} is not live")
        return fence.number


def _lease_view(row: Lease) -> LeaseView:
    return LeaseView(
        target=row.target,
        holder=row.holder,
        holder_name=row.holder_name,
        fence=row.fence,
        acquired_at=row.acquired_at,
        expires_at=row.expires_at,
    )
