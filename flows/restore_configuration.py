"""``restore-configuration``: put one host's configuration files back as of a chosen run.

The run to restore defaults to the host's newest complete configuration backup (or the newest at
or before ``at``). In an environment whose policy requires approval (production) the restore
waits for one. A safety backup of the host's current files is taken first; if the restore fails
that safety backup is put back (the compensation), so the host ends in its previous state.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger

from kmpops.backup import RestoreCandidate, choose_restore_point
from kmpops.errors import PolicyViolation
from tasks.approval import request_approval, requester_for_run
from tasks.artifacts import create_markdown_artifact
from tasks.backup import backup_host_configuration, restore_host_configuration
from tasks.common import audit_event, ops_config, records


@flow(name="restore-configuration")
def restore_configuration(
    host: str,
    backup_id: int | None = None,
    at: datetime | None = None,
    prune: bool = True,
    requested_by: str = "",
    safety_backup: bool = True,
) -> dict[str, Any]:
    """Restore ``host``'s configuration from catalog backup ``backup_id`` (default: newest
    complete one, at or before ``at``). ``prune`` removes files the backup did not have.

    Raises NotFound (no such backup), PolicyViolation (approval refused, or the backup failed
    verification), or the restore's error after the safety backup was put back.
    """
    logger = get_run_logger()
    cfg = ops_config()
    environment, _ = cfg.host(host)
    rows = records().backups(kind="configuration", name=host, states=("complete",))
    candidates = [
        RestoreCandidate(
            backup_id=str(r.id),
            subject=host,
            created_at=r.started_at,
            complete=True,
            verified={"verified": True, "failed": False}.get(r.verification or ""),
        )
        for r in rows
    ]
    chosen = choose_restore_point(
        candidates,
        subject=host,
        backup_id=None if backup_id is None else str(backup_id),
        at=at,
        allow_unverified=True,
    )
    if chosen.verified is False:
        raise PolicyViolation(
            f"configuration backup #{chosen.backup_id} of {host} failed "
            "verification; restore a verified one"
        )
    record_id = int(chosen.backup_id)
    policy = cfg.environment(environment).policy
    summary = (
        f"Restore the configuration of **{host}** ({environment}) as of backup "
        f"#{record_id} taken {chosen.created_at:%Y-%m-%d %H:%M:%S}Z"
        f"{' (files not in that backup are removed)' if prune else ''}."
    )
    if policy.approval_required:
        outcome = request_approval(
            subject=f"restore-configuration/{host}/{record_id}",
            summary_markdown=summary,
            policy=policy,
            requested_by=requester_for_run(requested_by),
        )
        if not outcome.approved:
            raise PolicyViolation(f"restore refused: {outcome.summary()}")
    safety = backup_host_configuration(host) if safety_backup else None
    try:
        result = restore_host_configuration(record_id, prune=prune)
    except Exception:
        if safety is not None:
            logger.error(
                "restore of %s failed; putting back safety backup #%s", host, safety["record_id"]
            )
            restore_host_configuration(safety["record_id"], prune=prune)
            audit_event(
                "configuration.restore_rolled_back",
                f"configuration/{host}",
                {"failed_backup": record_id, "safety_backup": safety["record_id"]},
            )
        raise
    create_markdown_artifact(
        key="restore-configuration",
        markdown=summary + f"\n\n- written: {len(result['written'])}\n- unchanged: "
        f"{len(result['unchanged'])}\n- removed: {len(result['removed'])}\n- safety backup: "
        f"{'#' + str(safety['record_id']) if safety else 'none'}\n",
    )
    return {**result, "safety_backup": safety["record_id"] if safety else None}
