"""``verify-backups``: the guide's verification procedures, for every backup not yet verified.

Per backup: completion check, integrity (re-read + sha256), restore test (database backups are
restored into a scratch database whose row counts are compared with the manifest and sanity
queries run; configuration blobs are re-read bit for bit). Then retention (``backup-retention``)
and the compliance check: the newest verified backup of each database / host is younger than its
RPO, and no expired backup awaits deletion. One table artifact per run; a failed verification or
compliance check notifies at critical severity, is on the audit chain, and fails the run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.backup_retention import backup_retention, compute_retention_plan
from kmpops.backup import schedule_period
from kmpops.errors import IntegrityError
from tasks.backup import (
    bounded,
    hosts_with_config,
    verify_configuration_backup,
    verify_database_backup,
)
from tasks.common import audit_event, notify, ops_config, records


def configuration_rpo() -> timedelta:
    """RPO of configuration backups: their schedule's period plus half (a late run is tolerated)."""
    cfg = ops_config()
    sched = cfg.backups.get("configuration")
    period = schedule_period(sched.schedule) if sched else timedelta(hours=6)
    return period + period / 2


def compliance_checks(
    databases: list[str], hosts: list[str], now: datetime
) -> list[dict[str, Any]]:
    """One row per database/host (newest verified backup within RPO) plus the retention row."""
    cfg = ops_config()
    rec = records()
    rows = []
    subjects = [("database", n, cfg.databases[n].rpo) for n in databases]
    subjects += [("configuration", h, configuration_rpo()) for h in hosts]
    for kind, name, rpo in subjects:
        verified = [
            b
            for b in rec.backups(kind=kind, name=name, states=("complete",))
            if b.verification == "verified"
        ]
        if not verified:
            rows.append(
                {
                    "check": f"RPO {kind}/{name}",
                    "ok": False,
                    "detail": f"no verified backup (RPO {rpo})",
                }
            )
            continue
        age = now - verified[0].started_at
        rows.append(
            {
                "check": f"RPO {kind}/{name}",
                "ok": age <= rpo,
                "detail": f"newest verified backup is {age} old (RPO {rpo})",
            }
        )
    pending = compute_retention_plan(now).to_delete
    rows.append(
        {
            "check": "retention obeyed",
            "ok": not pending,
            "detail": f"{len(pending)} expired backups await deletion"
            if pending
            else "no expired backup awaits deletion",
        }
    )
    return rows


@flow(name="verify-backups")
def verify_backups(
    databases: list[str] | None = None,
    hosts: list[str] | None = None,
    reverify: bool = False,
    apply_retention: bool = True,
) -> dict[str, Any]:
    """Verify every complete backup not yet verified (``reverify``: all of them) of ``databases``
    and ``hosts`` (default: all configured), apply retention, check compliance.

    Returns ``{"verified": [...], "failed": [...], "compliance": [...]}``; raises IntegrityError
    after reporting when a verification or a compliance check failed.
    """
    cfg = ops_config()
    rec = records()
    db_names = databases if databases is not None else sorted(cfg.databases)
    host_names = hosts if hosts is not None else hosts_with_config()
    pending = []
    for row in rec.backups(states=("complete",)):
        scope = db_names if row.kind == "database" else host_names
        if row.name in scope and (reverify or row.verification is None):
            pending.append(row)
    verify_database = bounded(verify_database_backup)
    verify_configuration = bounded(verify_configuration_backup)
    futures = [
        (verify_database if row.kind == "database" else verify_configuration).submit(row.id)
        for row in pending
    ]
    results = [f.result() for f in futures]
    table = []
    for res in results:
        checks = res["checks"]
        table.append(
            {
                "backup": res["record_id"],
                "kind": res["kind"],
                "name": res["name"],
                "completion": "ok" if checks["completion"]["ok"] else "FAIL",
                "integrity": "ok" if checks["integrity"]["ok"] else "FAIL",
                "restore test": (
                    "ok" if checks.get("restore_test", checks["integrity"])["ok"] else "FAIL"
                ),
                "result": "verified" if res["ok"] else "FAILED",
                "detail": "; ".join(c["detail"] for c in checks.values() if not c["ok"])[:300],
            }
        )
    if apply_retention:
        backup_retention()
    now = datetime.now(UTC)
    compliance = compliance_checks(db_names, host_names, now)
    for row in compliance:
        table.append(
            {
                "backup": "",
                "kind": "compliance",
                "name": row["check"],
                "completion": "",
                "integrity": "",
                "restore test": "",
                "result": "ok" if row["ok"] else "FAILED",
                "detail": row["detail"],
            }
        )
    create_table_artifact(
        key="verify-backups",
        table=table or [{"result": "nothing to verify"}],
        description=f"Backup verification {now:%Y-%m-%d %H:%M}Z",
    )
    failed = [r for r in results if not r["ok"]]
    failed_compliance = [r for r in compliance if not r["ok"]]
    if failed or failed_compliance:
        lines = [
            f"- backup #{r['record_id']} ({r['kind']} {r['name']}): verification FAILED"
            for r in failed
        ]
        lines += [f"- {r['check']}: {r['detail']}" for r in failed_compliance]
        notify(
            "critical",
            "Backup verification failed",
            "\n".join(lines),
            dedup_key="verify-backups:" + ",".join(str(r["record_id"]) for r in failed),
        )
        audit_event(
            "backup.verification_run_failed",
            "backups",
            {
                "failed": [r["record_id"] for r in failed],
                "compliance": [r["check"] for r in failed_compliance],
            },
        )
    summary = {
        "verified": [r["record_id"] for r in results if r["ok"]],
        "failed": [r["record_id"] for r in failed],
        "compliance": compliance,
    }
    if failed or failed_compliance:
        raise IntegrityError(
            f"{len(failed)} backup(s) failed verification, "
            f"{len(failed_compliance)} compliance check(s) failed"
        )
    return summary
