"""Recovery decisions: restoring a database backup, old copies to drop, and a crashed deploy.

Pure code, no I/O.

``plan_restore`` decides what a ``restore-database`` run may touch. Authority comes from
config: the environment is the database's own (a parameter may repeat it, never change it); the
target is the database itself or a *new* scratch database whose name matches the database's
``restore_scratch_pattern`` — never another configured database, never a system database.
Replacing an existing database always takes a safety backup first, and outside development
always needs an approval.

``expired_previous_copies`` picks the ``<dbname>__pre_<time>`` copies a restore left behind
(and ``<dbname>__restoring_<time>`` copies of a killed run) that are older than the configured
time.

``plan_recovery`` (deploys): a deploy-pipeline run audits ``deploy.activating`` (the hosts of
a batch and the release each had) before it switches anything, ``deploy.rollback`` per host it
put back, and ends with ``deploy.completed`` or ``deploy.rolled_back``. A run that ended neither
way (killed, its machine lost) may have left hosts switched: every host announced as activating
and not rolled back since is put back on its previous release. A host without a previous
release (a first install) gets ``None``: its ``current`` is removed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kmpops.errors import PolicyViolation

__all__ = [
    "DEVELOPMENT",
    "RecoveryPlan",
    "RestorePlan",
    "expired_previous_copies",
    "plan_recovery",
    "plan_restore",
    "previous_copy_name",
    "staging_copy_name",
]

DEVELOPMENT = "development"
SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})
_PG_MAX_IDENT = 63
_STAMP = "%Y%m%d%H%M%S"


@dataclass(frozen=True)
class RestorePlan:
    """What one restore does: ``target`` gets the backup; ``replace``: it exists and is swapped
    out (kept as a previous copy), which takes a ``safety_backup`` first; ``approval_reasons``
    non-empty: an approval is needed before anything changes."""

    database: str
    environment: str
    target: str
    replace: bool
    safety_backup: bool
    approval_reasons: tuple[str, ...] = ()

    @property
    def needs_approval(self) -> bool:
        """True if the run must be approved before it changes anything."""
        return bool(self.approval_reasons)


def plan_restore(
    *,
    database: str,
    dbname: str,
    environment: str,
    scratch_pattern: str,
    configured_dbnames: Mapping[str, str],
    existing: Collection[str],
    approval_required: bool,
    backup_label: str,
    backup_verified: bool | None,
    force: bool = False,
    requested_environment: str | None = None,
    requested_target: str | None = None,
) -> RestorePlan:
    """Decide a restore of ``database`` (configured ``dbname`` in ``environment``).

    ``configured_dbnames``: dbname -> configured database name, for every configured database;
    ``existing``: the databases on the server now; ``approval_required``: the environment's
    policy; ``backup_verified``: the chosen backup's verification (None: not verified yet).
    Raises PolicyViolation, naming what is wrong, for an environment other than the
    configured one, a target that is another configured database, a system database, an
    existing scratch database or a name outside the scratch pattern, and for a backup that
    failed verification without ``force``.
    """
    where = f"databases.{database}"
    if requested_environment is not None and requested_environment != environment:
        raise PolicyViolation(
            f"restore of {database}: environment {requested_environment!r} does not match "
            f"{where}.environment {environment!r} (the environment comes from ops.yaml; a "
            "parameter may repeat it, never change it)"
        )
    target = requested_target or dbname
    if target != dbname:
        owner = configured_dbnames.get(target)
        if owner is not None:
            raise PolicyViolation(
                f"restore of {database}: target {target!r} is the configured database {owner} "
                f"(databases.{owner}), not a scratch copy of {database}; refused"
            )
        if target in SYSTEM_DATABASES:
            raise PolicyViolation(f"restore of {database}: {target!r} is a system database")
        pattern = scratch_pattern.replace("{dbname}", dbname)
        if len(target) > _PG_MAX_IDENT or not fnmatch.fnmatchcase(target, pattern):
            raise PolicyViolation(
                f"restore of {database}: target {target!r} is neither {dbname!r} nor a scratch "
                f"name matching {pattern!r} ({where}.restore_scratch_pattern)"
            )
        if target in existing:
            raise PolicyViolation(
                f"restore of {database}: scratch database {target!r} already exists; a restore "
                "creates a new scratch database and never replaces one (drop it, or pick a new "
                "name)"
            )
    reasons: list[str] = []
    if backup_verified is False:
        if not force:
            raise PolicyViolation(
                f"{backup_label} of {database} failed verification: refusing to restore it "
                "(force=True asks for an approval to restore it anyway)"
            )
        reasons.append(f"{backup_label} **failed verification** (forced restore)")
    replace = target == dbname and target in existing
    if replace and (environment != DEVELOPMENT or approval_required):
        reasons.append(f"database `{target}` exists in **{environment}** and will be replaced")
    return RestorePlan(
        database=database,
        environment=environment,
        target=target,
        replace=replace,
        safety_backup=replace,
        approval_reasons=tuple(reasons),
    )


def previous_copy_name(target: str, at: datetime) -> str:
    """The name a replaced database is kept under: ``<target[:43]>__pre_<YYYYmmddHHMMSS>``."""
    return f"{target[:43]}__pre_{at.astimezone(UTC):{_STAMP}}"


def staging_copy_name(target: str, at: datetime) -> str:
    """The name a restore is staged under: ``<target[:37]>__restoring_<YYYYmmddHHMMSS>``."""
    return f"{target[:37]}__restoring_{at.astimezone(UTC):{_STAMP}}"


def expired_previous_copies(
    dbname: str, existing: Iterable[str], *, now: datetime, keep: timedelta
) -> list[str]:
    """The previous (``__pre_``) and abandoned staging (``__restoring_``) copies of ``dbname``
    among ``existing`` that are older than ``keep`` at ``now`` (their age is the time in their
    name, UTC), sorted. Names that only look alike (another prefix, a malformed time) are
    never chosen."""
    shapes = (
        re.compile(re.escape(dbname[:43]) + r"__pre_(\d{14})"),
        re.compile(re.escape(dbname[:37]) + r"__restoring_(\d{14})"),
    )
    expired = []
    for name in existing:
        for shape in shapes:
            match = shape.fullmatch(name)
            if match is None:
                continue
            try:
                made = datetime.strptime(match.group(1), _STAMP).replace(tzinfo=UTC)
            except ValueError:
                continue
            if now - made > keep:
                expired.append(name)
    return sorted(expired)


FINISHED = ("deploy.completed", "deploy.rolled_back")


@dataclass(frozen=True)
class RecoveryPlan:
    """What a crashed deploy run left to undo.

    ``finished``: the run ended on its own (completed, or its compensation ran): nothing to do.
    ``hosts``: (environment, host) -> the release to go back to (None: remove ``current``).
    """

    service: str | None
    version: str | None
    finished: str | None = None
    hosts: dict[tuple[str, str], str | None] = field(default_factory=dict)


def plan_recovery(events: Iterable[tuple[str, str, Mapping[str, Any]]]) -> RecoveryPlan:
    """The plan from one run's audit events, in chain order: ``(action, subject, details)``.

    Raises ValueError for an activating event without its service/environment subject or
    host list (a trail this code did not write).
    """
    service = version = None
    hosts: dict[tuple[str, str], str | None] = {}
    for action, subject, details in events:
        if action == "deploy.requested":
            service, _, rest = subject.partition("@")
            version = rest.split("->", 1)[0] or None
        elif action == "deploy.activating":
            svc, _, env = subject.partition("/")
            previous = details.get("previous")
            if not svc or not env or not isinstance(previous, Mapping):
                raise ValueError(f"deploy.activating {subject!r}: expected service/env + previous")
            service = service or svc
            version = version or details.get("version")
            for host, release in previous.items():
                hosts[(env, str(host))] = release
        elif action == "deploy.rollback":
            parts = subject.split("/")
            if len(parts) == 3:
                hosts.pop((parts[1], parts[2]), None)
        elif action in FINISHED:
            return RecoveryPlan(service, version, finished=action)
    return RecoveryPlan(service, version, hosts=hosts)
