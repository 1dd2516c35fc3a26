"""approval-drill: a break-glass access request that goes through the environment's approval gate.

The guide's access management asks that emergency (break-glass) access to production be
requested with a reason, approved by someone other than the requester, time-boxed and recorded.
This flow is that gate, and the procedure operators drill it with:

validate the request against ops.yaml -> plan (who, which hosts, until when, who may approve)
-> ``dry_run`` stops here -> pause for approval (the environment's policy: approvers, four-eyes,
quorum, approver token, timeout outcome) -> record the grant or denial (change request + audit
chain) -> notify.

It grants nothing on the hosts itself: a granted request is the record ``provision-access``
acts on, and its expiry is in the record. A denied or timed-out request raises PolicyViolation
after it has been recorded, so the run ends Failed and visible.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from kmpops import shellsafe
from kmpops.errors import ConfigError, PolicyViolation
from tasks.approval import request_approval, requester_for_run
from tasks.artifacts import create_markdown_artifact
from tasks.common import audit, notify, ops_config, records, run_id


class BreakGlassRequest(BaseModel):
    """Who asks for emergency access to which hosts, why and for how long. No secrets here."""

    requester: str = Field(description="who needs the access (cannot approve it themselves)")
    reason: str = Field(min_length=3, description="why (incident number, what is broken)")
    environment: str = Field(default="production", description="environment from ops.yaml")
    hosts: list[str] = Field(
        default_factory=list, description="host names; empty means every host of the environment"
    )
    duration_minutes: int = Field(default=60, ge=5, le=480, description="how long access lasts")
    dry_run: bool = Field(default=False, description="show the plan, ask nobody, change nothing")

    @field_validator("requester", "environment")
    @classmethod
    def _name(cls, value: str, info: ValidationInfo) -> str:
        return shellsafe.validate_name(value.strip(), what=str(info.field_name))


def plan_markdown(req: BreakGlassRequest, hosts: list[str], approvers: list[str]) -> str:
    """The plan shown in the approval dialog and stored as an artifact."""
    until = datetime.now(UTC) + timedelta(minutes=req.duration_minutes)
    rows = "\n".join(f"| `{h}` | shell as the deploy user |" for h in hosts)
    return (
        f"### Break-glass access to **{req.environment}**\n\n"
        f"**Requested by:** {req.requester}  \n"
        f"**Reason:** {req.reason}  \n"
        f"**Duration:** {req.duration_minutes} min (until {until:%Y-%m-%d %H:%M} UTC)  \n"
        f"**May approve:** {', '.join(approvers) or '(nobody listed)'}\n\n"
        f"| host | access |\n| --- | --- |\n{rows}\n"
    )


@flow(name="approval-drill")
def approval_drill(
    request: BreakGlassRequest, approval_timeout_s: float | None = None
) -> dict[str, Any]:
    """Ask for, decide and record a break-glass access request.

    Returns ``{"status", "approved_by", "expires_at", "change_request", "plan"}``. Raises
    ConfigError for an unknown environment or host (nothing recorded), PolicyViolation when the
    request is rejected or times out with a reject outcome (recorded first). Nothing to roll back:
    the only changes are records.
    """
    logger = get_run_logger()
    cfg = ops_config()
    env = cfg.environments.get(request.environment)
    if env is None:
        raise ConfigError([f"environment: unknown environment {request.environment!r}"])
    known = [h.name for h in env.hosts]
    unknown = sorted(set(request.hosts) - set(known))
    if unknown:
        raise ConfigError([f"hosts: not in {request.environment}: {', '.join(unknown)}"])
    hosts = [h for h in known if h in request.hosts] if request.hosts else known
    plan = plan_markdown(request, hosts, list(env.policy.approvers))
    create_markdown_artifact(plan, key="break-glass-plan", description="break-glass request")
    subject = f"break-glass:{request.environment}:{request.requester}"
    if request.dry_run:
        return {"status": "dry_run", "approved_by": [], "expires_at": None, "plan": plan}

    audit("break-glass.requested", subject, hosts=hosts, reason=request.reason)
    outcome = request_approval(
        subject=subject,
        summary_markdown=plan,
        policy=env.policy,
        requested_by=requester_for_run(request.requester),
        timeout_s=approval_timeout_s,
        required=max(env.policy.quorum, 1),
    )
    granted = outcome.approved
    expires = datetime.now(UTC) + timedelta(minutes=request.duration_minutes) if granted else None
    change = records().add_change_request(
        title=f"break-glass access to {request.environment} for {request.requester}",
        description=request.reason,
        environments=[request.environment],
        implementation_plan=plan,
        risk="high",
        state="granted" if granted else "denied",
        requested_by=request.requester,
        closed_at=None if granted else datetime.now(UTC),
        outcome=outcome.status,
        details={
            "kind": "break-glass",
            "hosts": hosts,
            "approved_by": list(outcome.approved_by),
            "expires_at": expires.isoformat() if expires else None,
            "run_id": run_id(),
        },
    )
    action = "break-glass.granted" if granted else "break-glass.denied"
    audit(action, subject, change_request=change.id, status=outcome.status, hosts=hosts)
    notify(
        "warning" if granted else "info",
        f"break-glass {request.environment} for {request.requester}: "
        + ("granted" if granted else outcome.status),
        f"approved by {', '.join(outcome.approved_by) or 'nobody'}; hosts: {', '.join(hosts)}",
        dedup_key=f"break-glass-{change.id}",
    )
    if not granted:
        raise PolicyViolation(
            f"break-glass request {change.id} not granted: {outcome.reason or outcome.status}"
        )
    logger.info("break-glass request %s granted until %s", change.id, expires)
    return {
        "status": outcome.status,
        "approved_by": list(outcome.approved_by),
        "expires_at": expires.isoformat() if expires else None,
        "change_request": change.id,
        "plan": plan,
    }
