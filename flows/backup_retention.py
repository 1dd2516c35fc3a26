"""``backup-retention``: delete expired backups, never the last verified one.

The plan is pure (``kmpops.plans.retention``): an expired backup (older than
``backups.<kind>.retention``) goes only when a newer verified backup of the same database or
host exists; configuration blobs still referenced by a kept manifest are never deleted. The plan
is shown as a table artifact; ``dry_run=True`` stops there.

Copies a restore replaced (``<dbname>__pre_<time>``, and staging copies of a killed restore)
are dropped once older than their database's ``keep_previous_copies``, measured against the
real clock (``tasks.backup.drop_expired_previous_copies``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from kmpops.backup import BLOB_PREFIX, ConfigurationManifest
from kmpops.plans.retention import (
    BackupFact,
    BlobFact,
    RetentionPlan,
    RetentionPolicy,
    plan_retention,
)
from tasks.backup import (
    apply_retention_deletions,
    bounded,
    drop_expired_previous_copies,
    open_object_store,
)
from tasks.common import audit_event, ops_config, records


def retention_policy() -> RetentionPolicy:
    """Retention per kind from ``backups:`` (the guide's 30d / 7d when absent)."""
    backups = ops_config().backups
    default = RetentionPolicy()
    return RetentionPolicy(
        database=backups["database"].retention if "database" in backups else default.database,
        configuration=(
            backups["configuration"].retention
            if "configuration" in backups
            else default.configuration
        ),
    )


def backup_facts() -> list[BackupFact]:
    """The catalog as retention facts (running backups are left out: they are in flight)."""
    facts = []
    for row in records().backups(states=("complete", "failed")):
        blobs: frozenset[str] = frozenset()
        if row.kind == "configuration" and row.state == "complete":
            blobs = ConfigurationManifest.model_validate(row.manifest).blob_keys
        facts.append(
            BackupFact(
                backup_id=str(row.id),
                kind=row.kind,  # type: ignore[arg-type]
                subject=row.name,
                created_at=row.started_at,
                complete=row.state == "complete",
                verified={"verified": True, "failed": False}.get(row.verification or ""),
                blobs=blobs,
            )
        )
    return facts


def compute_retention_plan(now: datetime | None = None) -> RetentionPlan:
    """The retention plan for the catalog and the stored blobs as of ``now``."""
    store = open_object_store()
    blobs = [BlobFact(key=o.key, last_modified=o.last_modified) for o in store.list(BLOB_PREFIX)]
    return plan_retention(
        backup_facts(), now=now or datetime.now(UTC), policy=retention_policy(), blobs=blobs
    )


@flow(name="backup-retention")
def backup_retention(dry_run: bool = False, as_of: datetime | None = None) -> dict[str, Any]:
    """Plan and apply retention. ``as_of`` evaluates ages at another time (drills, tests).

    Returns the counts deleted (zero with ``dry_run``) and the plan's decisions.
    """
    now = as_of or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    plan = compute_retention_plan(now)
    rows = [
        {
            "backup": d.backup_id,
            "kind": d.kind,
            "subject": d.subject,
            "created": d.created_at.isoformat(timespec="seconds"),
            "action": d.action,
            "reason": d.reason,
        }
        for d in plan.decisions
    ]
    create_table_artifact(
        key="backup-retention",
        table=rows or [{"backup": "", "action": "", "reason": "no backups"}],
        description=f"Retention plan{' (dry run)' if dry_run else ''}: "
        f"{len(plan.to_delete)} backups and {len(plan.delete_blobs)} blobs to delete, "
        f"{plan.kept_blobs} blobs kept",
    )
    result: dict[str, Any] = {
        "delete": [int(d.backup_id) for d in plan.to_delete],
        "keep": [int(d.backup_id) for d in plan.to_keep],
        "blobs_to_delete": len(plan.delete_blobs),
        "dry_run": dry_run,
        "deleted": {"backups": 0, "blobs": 0},
    }
    # old restore copies: their age is real time, never as_of (listed only with dry_run)
    result["previous_copies_dropped"] = bounded(drop_expired_previous_copies)(dry_run=dry_run)
    if dry_run or plan.empty:
        return result
    result["deleted"] = apply_retention_deletions(result["delete"], list(plan.delete_blobs))
    audit_event("retention.applied", "backups", {**result["deleted"], "as_of": now.isoformat()})
    return result
