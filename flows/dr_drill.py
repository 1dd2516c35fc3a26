"""``dr-drill``: a scheduled disaster-recovery drill with measured RTO and RPO.

For each database (and each host with configuration), the newest verified backup is restored
into a scratch environment and verified (scratch database: row counts + sanity queries;
configuration: every blob re-read bit for bit). **RPO** is the age of the newest restorable
backup at drill time (worst subject); **RTO** is the wall time from drill start until everything
was restored and verified. Both are compared with the targets (``databases.<name>.rpo/.rto``;
configuration RPO from its schedule), the drill is recorded, and a markdown artifact shows the
result with the trend of past drills.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.verify_backups import configuration_rpo
from kmpops.backup import DrillOutcome, render_drill_report
from tasks.backup import (
    bounded,
    hosts_with_config,
    verify_configuration_backup,
    verify_database_backup,
)
from tasks.common import audit_event, notify, ops_config, records, run_id


@flow(name="dr-drill")
def dr_drill(databases: list[str] | None = None, hosts: list[str] | None = None) -> dict[str, Any]:
    """Run a drill over ``databases`` and ``hosts`` (default: all configured); returns the
    measured RTO/RPO (seconds), targets, per-subject results and whether targets were met.
    """
    cfg = ops_config()
    rec = records()
    db_names = databases if databases is not None else sorted(cfg.databases)
    host_names = hosts if hosts is not None else hosts_with_config()
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    subjects: list[dict[str, Any]] = []
    futures = []
    for kind, names, verify in (
        ("database", db_names, bounded(verify_database_backup)),
        ("configuration", host_names, bounded(verify_configuration_backup)),
    ):
        for name in names:
            verified = [
                b
                for b in rec.backups(kind=kind, name=name, states=("complete",))
                if b.verification == "verified"
            ]
            if not verified:
                subjects.append(
                    {
                        "subject": f"{kind}/{name}",
                        "ok": False,
                        "rpo_s": None,
                        "detail": "no verified backup to restore",
                    }
                )
                continue
            newest = verified[0]
            entry = {
                "subject": f"{kind}/{name}",
                "backup": newest.id,
                "rpo_s": (started_at - newest.started_at).total_seconds(),
            }
            subjects.append(entry)
            futures.append((entry, verify.submit(newest.id)))
    for entry, future in futures:
        result = future.result()
        entry["ok"] = result["ok"]
        entry["detail"] = "; ".join(
            f"{k}: {c['detail'] if (k == 'restore_test' or not c['ok']) else 'ok'}"
            for k, c in result["checks"].items()
        )
    rto_s = time.monotonic() - t0 if futures and all(s["ok"] for s in subjects) else None
    rpos = [s["rpo_s"] for s in subjects]
    rpo_s = None if not subjects or any(r is None for r in rpos) else max(rpos)
    target_rto = min((cfg.databases[n].rto.total_seconds() for n in db_names), default=1800.0)
    target_rpo = min(
        [cfg.databases[n].rpo.total_seconds() for n in db_names]
        + ([configuration_rpo().total_seconds()] if host_names else []),
        default=90000.0,
    )
    passed = rto_s is not None and rpo_s is not None and rto_s <= target_rto and rpo_s <= target_rpo
    details = {"subjects": subjects}
    rec.add_drill(
        ts=started_at,
        rto_s=rto_s,
        rpo_s=rpo_s,
        target_rto_s=target_rto,
        target_rpo_s=target_rpo,
        ok=passed,
        details=details,
        run_id=run_id(),
    )
    audit_event("dr.drill", "backups", {"rto_s": rto_s, "rpo_s": rpo_s, "ok": passed})
    history = [
        DrillOutcome(
            started_at=d.ts,
            rto_seconds=d.rto_s,
            rpo_seconds=d.rpo_s,
            rto_target_seconds=d.target_rto_s or target_rto,
            rpo_target_seconds=d.target_rpo_s or target_rpo,
            passed=d.ok,
        )
        for d in rec.drills(limit=20)
    ]
    current = DrillOutcome(
        started_at=started_at,
        rto_seconds=rto_s,
        rpo_seconds=rpo_s,
        rto_target_seconds=target_rto,
        rpo_target_seconds=target_rpo,
        passed=passed,
        detail="\n".join(
            f"- {s['subject']}: {'ok' if s['ok'] else 'FAILED'} — {s['detail']}" for s in subjects
        ),
    )
    report = render_drill_report(current, history)
    create_markdown_artifact(key="dr-drill", markdown=report, description="DR drill: RTO/RPO")
    if not passed:
        notify("critical", "DR drill missed its targets", report, dedup_key="dr-drill")
    return {
        "rto_s": rto_s,
        "rpo_s": rpo_s,
        "target_rto_s": target_rto,
        "target_rpo_s": target_rpo,
        "passed": passed,
        "subjects": subjects,
        "report": report,
    }
