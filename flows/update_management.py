"""``update-management``: the guide's update process for a patch, around the deploy pipeline.

1. notification (info: what is coming, where, why);
2. impact assessment (hosts and their current version, version bump, risk score);
3-5. staging test, production rollout, verification: ``deploy-pipeline`` as a subflow (staging
   → integration tests → monitoring → approval → production in batches → verify; it rolls
   back itself on failure);
6. documentation: a markdown record of the update (artifact + audit event), and a closing
   notification — on success and on failure alike.

The deploy pipeline is imported inside the flow, so this module imports without it.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, field_validator

from kmpops.errors import PolicyViolation
from kmpops.plans.approval import is_service_identity
from kmpops.plans.checklist import release_refusal
from kmpops.plans.risk import assess_risk
from kmpops.shellsafe import validate_name
from tasks.approval import requester_for_run
from tasks.common import audit, notify, ops_config, records
from tasks.reports import markdown_table, publish_report

UpdateKind = Literal["security", "bugfix", "feature", "dependency", "system"]


class UpdateRequest(BaseModel):
    """An update of one service to one version (no secrets: parameters are visible)."""

    service: str
    version: str
    kind: UpdateKind = "bugfix"
    description: str = Field(default="", description="what the update changes and why")
    environment: str = Field(default="production", description="target (via staging)")
    requested_by: str = ""
    change_request_id: int | None = None
    dry_run: bool = Field(default=False, description="assess and plan only")
    allow_first_install: bool = False
    bake_seconds: float | None = Field(default=None, ge=0)
    emergency: bool = Field(
        default=False,
        description="emergency override (a freeze window, a release marked bad): one more approver",
    )

    @field_validator("service", "environment", "version")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, what="name")


def classify_bump(old: str | None, new: str) -> str:
    """``major``/``minor``/``patch`` between dotted numeric versions, else ``first install`` or
    ``other`` (non-numeric or a downgrade)."""
    if old is None:
        return "first install"
    nums = [re.match(r"^(\d+)\.(\d+)\.(\d+)", v) for v in (old, new)]
    if not all(nums):
        return "other"
    a = tuple(int(x) for x in nums[0].groups())  # type: ignore[union-attr]
    b = tuple(int(x) for x in nums[1].groups())  # type: ignore[union-attr]
    if b <= a:
        return "other"
    return "major" if b[0] != a[0] else "minor" if b[1] != a[1] else "patch"


def impact_assessment(req: UpdateRequest, now: datetime) -> dict[str, Any]:
    """Hosts touched with their current versions, the bump, and the risk of the change."""
    cfg = ops_config()
    cfg.service(req.service)
    envs = ["staging", req.environment] if req.environment != "staging" else ["staging"]
    envs = [e for e in envs if e in cfg.environments] or [req.environment]
    rec = records()
    rows = []
    for env in envs:
        for host in cfg.environment(env).hosts:
            current = rec.current_release(req.service, env, host.name)
            rows.append(
                {
                    "environment": env,
                    "host": host.name,
                    "current": current.version if current else None,
                    "new": req.version,
                    "bump": classify_bump(current.version if current else None, req.version),
                }
            )
    risk = assess_risk(
        environments=envs,
        hosts_touched=len(rows),
        hosts_total=len(rows),
        services=1,
        at=now,
    )
    bumps = sorted({r["bump"] for r in rows})
    return {"environments": envs, "hosts": rows, "bumps": bumps, "risk": risk}


@flow(name="update-management", flow_run_name="update-{request.service}-{request.version}")
def update_management(request: UpdateRequest) -> dict[str, Any]:
    """Notify, assess, roll out through the deploy pipeline, document.

    Returns the pipeline's result with the assessment. Raises PolicyViolation before anything
    (no notification, no deploy) for a release an incident marked bad, unless ``emergency``
    (then the pipeline asks for one more approver). Re-raises the pipeline's error after the
    failure was documented and notified (the pipeline has rolled back what it changed).
    """
    from tasks.deploy import marked_bad

    req = request
    logger = get_run_logger()
    now = datetime.now(UTC)
    who = requester_for_run(req.requested_by)
    subject = f"{req.service}@{req.version}->{req.environment}"
    refusal = release_refusal(
        marked_bad(req.service, req.version),
        service=req.service,
        version=req.version,
        emergency=req.emergency,
    )
    if refusal:
        audit("update.refused", subject, reason=refusal, requested_by=who)
        raise PolicyViolation(f"update refused: {refusal}")
    impact = impact_assessment(req, now)
    risk = impact["risk"]
    notify(
        "info",
        f"Update scheduled: {subject}",
        f"{req.kind} update of {req.service} to {req.version} on "
        f"{', '.join(impact['environments'])} ({len(impact['hosts'])} hosts), requested by "
        f"{who}; risk {risk.level}. {req.description}".strip(),
        dedup_key=f"update-{subject}-start",
    )
    audit("update.started", subject, kind=req.kind, risk=risk.level, requested_by=who)
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    started = time.monotonic()
    outcome: dict[str, Any] | None = None
    error: BaseException | None = None
    try:
        outcome = deploy_pipeline(
            DeployRequest(
                service=req.service,
                version=req.version,
                environment=req.environment,
                dry_run=req.dry_run,
                change_request_id=req.change_request_id,
                requested_by="" if is_service_identity(who) else who,
                allow_first_install=req.allow_first_install,
                bake_seconds=req.bake_seconds,
                emergency=req.emergency,
            )
        )
    except Exception as exc:
        error = exc
    seconds = round(time.monotonic() - started, 1)
    status = "failed" if error else str((outcome or {}).get("status", "done"))
    doc = [
        f"# Update record: {req.service} {req.version} — {status}",
        "",
        f"- **Kind:** {req.kind}",
        f"- **Requested by:** {who}",
        f"- **When:** {now.isoformat(timespec='seconds')} (rollout {seconds}s)",
        f"- **Target:** {req.environment} via {', '.join(impact['environments'])}",
        f"- **Version change:** {', '.join(impact['bumps'])}",
    ]
    if req.change_request_id is not None:
        doc.append(f"- **Change request:** #{req.change_request_id}")
    if req.description:
        doc += ["", "## Description", "", req.description]
    doc += ["", "## Impact assessment", "", risk.to_markdown(), "", markdown_table(impact["hosts"])]
    doc += ["", "## Outcome", ""]
    if error is not None:
        doc.append(f"Failed: {type(error).__name__}: {error}")
        doc.append("The deploy pipeline rolled back the hosts it had changed.")
    else:
        assert outcome is not None
        doc.append(f"Status: {status}.")
        if outcome.get("approvals"):
            doc.append(f"Approvals: {', '.join(outcome['approvals'])}.")
        if outcome.get("hosts"):
            doc.append(f"Hosts updated: {', '.join(outcome['hosts'])}.")
    publish_report(
        "update-record", "\n".join(doc) + "\n", impact["hosts"], description=f"update {subject}"
    )
    audit(
        "update.documented",
        subject,
        status=status,
        seconds=seconds,
        error=f"{type(error).__name__}: {error}" if error else None,
    )
    notify(
        "critical" if error else "info",
        f"Update {status}: {subject}",
        f"{req.kind} update of {req.service} to {req.version}: {status} after {seconds}s"
        + (f" — {type(error).__name__}: {error}" if error else ""),
        dedup_key=f"update-{subject}-end",
    )
    logger.info("update %s: %s", subject, status)
    if error is not None:
        raise error
    return {"status": status, "impact": {**impact, "risk": risk.level}, "deploy": outcome}
