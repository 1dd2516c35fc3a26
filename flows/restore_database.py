"""``restore-database``: restore a chosen backup (default: the newest verified) into a database.

Authority comes from ops.yaml (``kmpops.plans.recovery.plan_restore``): the environment is the
database's configured one (a parameter may repeat it, never change it); the target is the
database itself or a new scratch database matching its ``restore_scratch_pattern``, never
another configured database. Refusals come first and change nothing: a backup whose
verification failed is refused unless ``force=True`` *and* an approval is granted. Restoring
over the existing database outside development (or wherever the policy requires approval)
needs an approval, and replacing it always takes a safety backup of it first.

The dump is restored into a fresh staging database and proven there — row counts equal the
backup manifest's, the sanity queries pass — before it replaces the target in one transaction;
a copy that is not proven never goes live (the run fails naming the differences, the target
keeps its data). The replaced database is kept, renamed ``<dbname>__pre_<time>``, for
``keep_previous_copies`` (renaming it back undoes the restore); backup-retention drops it after.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from kmpops import backup as core
from kmpops.config import Policy
from kmpops.connectors.database import PostgresDatabase
from kmpops.errors import PolicyViolation, Unsupported
from kmpops.plans.recovery import plan_restore
from tasks.approval import request_approval, requester_for_run
from tasks.artifacts import create_markdown_artifact
from tasks.audit import anchor_after_change
from tasks.backup import (
    backup_database_to_store,
    bounded,
    database_config,
    open_database,
    restore_database_backup,
)
from tasks.common import audit_event, ops_config, records
from tasks.locks import database_targets, locked


def _policy(environment: str) -> Policy:
    cfg = ops_config()
    return cfg.environments[environment].policy if environment in cfg.environments else Policy()


@flow(name="restore-database")
@locked(lambda database, **_: database_targets([database]))
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
    ``at``) into ``target_dbname`` (default: the configured dbname; otherwise a new scratch
    name matching ``restore_scratch_pattern``). ``environment``, if given, must equal the
    database's configured environment.

    Raises NotFound (no usable backup), PolicyViolation (environment or target not allowed by
    ops.yaml, failed backup without force+approval, approval refused), IntegrityError (the
    stored dump does not match its catalog sha256, or the restored copy does not match its
    manifest or fails a sanity query — then nothing went live).
    """
    cfg = ops_config()
    dbcfg = database_config(database)
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
    db = open_database(database)
    if not isinstance(db, PostgresDatabase):
        raise Unsupported(
            f"restore-database restores PostgreSQL backups; {database} is {dbcfg.kind} "
            "(copy its verified backup file in place)"
        )
    policy = _policy(dbcfg.environment)
    try:
        plan = plan_restore(
            database=database,
            dbname=db.dbname,
            environment=dbcfg.environment,
            scratch_pattern=dbcfg.restore_scratch_pattern,
            configured_dbnames={
                c.dbname: name for name, c in cfg.databases.items() if c.dbname is not None
            },
            existing=db.list_databases(),
            approval_required=policy.approval_required,
            backup_label=f"backup #{record_id}",
            backup_verified=chosen.verified,
            force=force,
            requested_environment=environment,
            requested_target=target_dbname,
        )
    except PolicyViolation as exc:
        audit_event(
            "restore.refused", f"database/{database}", {"backup": record_id, "reason": str(exc)}
        )
        raise
    target = plan.target
    subject = f"restore-database/{database}/{record_id}->{target}"
    if plan.needs_approval:
        summary = (
            f"Restore backup #{record_id} of **{database}** (taken "
            f"{chosen.created_at:%Y-%m-%d %H:%M:%S}Z) into `{target}` ({plan.environment}).\n\n"
            + "\n".join(f"- {r}" for r in plan.approval_reasons)
            + ("\n- a safety backup of the target is taken first" if plan.safety_backup else "")
            + "\n- the restored copy must match the backup's row counts and pass the sanity "
            "queries before it replaces anything"
        )
        if not policy.approvers:
            raise PolicyViolation(
                f"{subject}: approval needed but environment {plan.environment!r} lists no "
                "approvers"
            )
        outcome = request_approval(
            subject=subject,
            summary_markdown=summary,
            policy=policy,
            requested_by=requester_for_run(requested_by),
        )
        if not outcome.approved:
            raise PolicyViolation(f"restore refused: {outcome.summary()}")
    safety = bounded(backup_database_to_store)(database) if plan.safety_backup else None
    result = bounded(restore_database_backup)(
        record_id, target, replace=plan.replace, verify_sha256=chosen.verified is not False
    )
    create_markdown_artifact(
        key="restore-database",
        markdown=(
            f"# Restore of {database}\n\n| | |\n|---|---|\n| backup | #{record_id} |\n"
            f"| target | `{target}` ({plan.environment}) |\n"
            f"| tables | {len(result['row_counts'])} |\n"
            f"| row counts match manifest (checked before the swap) | "
            f"{result['row_counts_match']} |\n"
            f"| sanity queries passed | {result['sanity_queries']} |\n"
            f"| previous database kept as | `{result.get('previous_dbname') or '—'}` "
            f"(for {dbcfg.keep_previous_copies}) |\n"
            f"| safety backup | {'#' + str(safety['record_id']) if safety else '—'} |\n"
            f"| seconds | {result['seconds']} |\n"
        ),
    )
    if plan.environment != "development":  # a change outside development: anchor the evidence
        anchor_after_change(f"restore-database {database} -> {target} ({plan.environment})")
    return {**result, "backup": record_id, "safety_backup": safety["record_id"] if safety else None}
