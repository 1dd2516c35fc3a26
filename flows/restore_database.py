"""``restore-database``: restore a chosen backup (default: the newest verified) into a database.

Refusals come first and change nothing: a backup whose verification failed is refused unless
``force=True`` *and* an approval is granted. Restoring over an existing database in staging or
production (or any environment whose policy requires approval) needs an approval and first takes
a safety backup of the target. The dump is restored into a fresh database that replaces the
target only once complete; the old target is kept, renamed, so a bad restore is undone by
renaming it back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from kmpops import backup as core
from kmpops.config import Policy
from kmpops.connectors.database import PostgresDatabase
from kmpops.errors import PolicyViolation, Unsupported
from tasks.approval import request_approval, requester_for_run
from tasks.backup import (
    backup_database_to_store,
    database_config,
    open_database,
    restore_database_backup,
)
from tasks.common import audit_event, ops_config, records

PROTECTED_ENVIRONMENTS = ("staging", "production")


def _policy(environment: str) -> Policy:
    cfg = ops_config()
    return cfg.environments[environment].policy if environment in cfg.environments else Policy()


@flow(name="restore-database")
def restore_database(
    database: str,
    backup_id: int | None = None,
    at: datetime | None = None,
    target_dbname: str | None = None,
    environment: str | None = None,
    force: bool = False,
    requested_by: str = "",
) -> dict[str, Any]:
    """Restore ``database``'s backup ``backup_id`` (default: newest verified, at or before
    ``at``) into ``target_dbname`` (default: the configured dbname) in ``environment``
    (default: the database's configured ``environment``, itself ``production`` by default).

    Raises NotFound (no usable backup), PolicyViolation (failed backup without force+approval,
    approval refused), IntegrityError (the stored dump does not match its catalog sha256).
    """
    dbcfg = database_config(database)
    environment = environment or dbcfg.environment
    target = target_dbname or dbcfg.dbname or database
    rows = records().backups(kind="database", name=database, states=("complete",))
    candidates = [
        core.RestoreCandidate(
            backup_id=str(r.id),
            subject=database,
            created_at=r.started_at,
            complete=True,
            verified={"verified": True, "failed": False}.get(r.verification or ""),
        )
        for r in rows
    ]
    chosen = core.choose_restore_point(
        candidates,
        subject=database,
        at=at,
        backup_id=None if backup_id is None else str(backup_id),
    )
    record_id = int(chosen.backup_id)
    subject = f"restore-database/{database}/{record_id}->{target}"
    policy = _policy(environment)
    db = open_database(database)
    if not isinstance(db, PostgresDatabase):
        raise Unsupported(
            f"restore-database restores PostgreSQL backups; {database} is {dbcfg.kind} "
            "(copy its verified backup file in place)"
        )
    exists = db.database_exists(target)
    reasons = []
    if chosen.verified is False:
        if not force:
            audit_event(
                "restore.refused",
                f"database/{database}",
                {"backup": record_id, "reason": "backup failed verification"},
            )
            raise PolicyViolation(
                f"backup #{record_id} of {database} failed verification: refusing to restore "
                "it (force=True asks for an approval to restore it anyway)"
            )
        reasons.append(f"backup #{record_id} **failed verification** (forced restore)")
    if exists and (environment in PROTECTED_ENVIRONMENTS or policy.approval_required):
        reasons.append(f"database `{target}` exists in **{environment}** and will be replaced")
    if reasons:
        summary = (
            f"Restore backup #{record_id} of **{database}** (taken "
            f"{chosen.created_at:%Y-%m-%d %H:%M:%S}Z) into `{target}` ({environment}).\n\n"
            + "\n".join(f"- {r}" for r in reasons)
            + ("\n- a safety backup of the target is taken first" if exists else "")
        )
        if not policy.approvers:
            raise PolicyViolation(
                f"{subject}: approval needed but environment {environment!r} lists no approvers"
            )
        outcome = request_approval(
            subject=subject,
            summary_markdown=summary,
            policy=policy,
            requested_by=requester_for_run(requested_by),
        )
        if not outcome.approved:
            raise PolicyViolation(f"restore refused: {outcome.summary()}")
    safety = None
    if exists and target == dbcfg.dbname:
        safety = backup_database_to_store(database)
    result = restore_database_backup(
        record_id, target, replace=exists, verify_sha256=chosen.verified is not False
    )
    create_markdown_artifact(
        key="restore-database",
        markdown=(
            f"# Restore of {database}\n\n| | |\n|---|---|\n| backup | #{record_id} |\n"
            f"| target | `{target}` ({environment}) |\n| tables | {len(result['row_counts'])} |\n"
            f"| row counts match manifest | {result['row_counts_match']} |\n"
            f"| previous database kept as | `{result.get('previous_dbname') or '—'}` |\n"
            f"| safety backup | {'#' + str(safety['record_id']) if safety else '—'} |\n"
            f"| seconds | {result['seconds']} |\n"
        ),
    )
    return {**result, "backup": record_id, "safety_backup": safety["record_id"] if safety else None}
