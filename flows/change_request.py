"""change-request: the guide's change management, from request to close.

request -> impact assessment (hosts and services touched, risk from environment, blast radius,
time and freeze windows) -> approval whose quorum follows the risk (low 0, medium 1, high 2; a
freeze override adds one) -> implementation by running deploy-pipeline as a subflow per service
-> on failure the rollback procedure (deploy-pipeline rolls back its own hosts; services already
deployed by this change are put back on their previous releases) -> closed with its outcome.
Every state is in the records store (change_requests) and the audit chain.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, field_validator

from flows.deploy_pipeline import DeployRequest, deploy_pipeline
from kmpops import shellsafe
from kmpops.errors import PolicyViolation
from kmpops.plans.approval import required_approvals
from kmpops.plans.freeze import check_freeze
from kmpops.plans.risk import assess_risk
from kmpops.release import validate_version
from tasks.approval import request_approval
from tasks.artifacts import create_markdown_artifact
from tasks.common import actor, audit, notify, ops_config, records
from tasks.deploy import close_connections, rollback_host


class ChangeRequestInput(BaseModel):
    """A change request as an operator files it. No secrets here."""

    title: str = Field(min_length=3, max_length=200, description="what changes")
    description: str = Field(default="", description="why")
    services: list[str] = Field(min_length=1, description="services touched")
    environments: list[str] = Field(min_length=1, description="environments touched")
    version: str = Field(description="release version to deploy")
    implementation_plan: str = Field(default="deploy-pipeline per service")
    rollback_plan: str = Field(default="deploy-pipeline rollback to each host's previous release")
    requested_by: str = Field(default="", description="who asks (four-eyes)")
    emergency: bool = Field(default=False, description="override a freeze window")

    @field_validator("services", "environments")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [shellsafe.validate_name(v, what="name") for v in value]

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return validate_version(value)


def _close(cr_id: int, state: str, outcome: str, **details: Any) -> dict[str, Any]:
    rec = records()
    row = rec.change_request(cr_id)
    rec.update_change_request(
        cr_id,
        state=state,
        outcome=outcome,
        closed_at=datetime.now(UTC),
        details={**(row.details or {}), **details},
    )
    audit("change.closed", f"change-request/{cr_id}", state=state, outcome=outcome, **details)
    create_markdown_artifact(
        f"# Change request #{cr_id}: {row.title}\n\n**Outcome: {outcome}** (state {state})\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in details.items()),
        key="change-request-outcome",
    )
    return {"id": cr_id, "state": state, "outcome": outcome, **details}


@flow(name="change-request", flow_run_name="change-{change.title}")
def change_request(change: ChangeRequestInput) -> dict[str, Any]:
    """Take a change request from request to close; returns its final state and outcome.

    Raises ValueError/KeyError for unknown services or environments before anything is
    recorded. A refused (freeze) or rejected change is closed, not failed; a failed
    implementation is rolled back, closed as ``rolled_back`` and the flow run fails.
    """
    logger = get_run_logger()
    cfg = ops_config()
    for name in change.services:
        cfg.service(name)
    for name in change.environments:
        cfg.environment(name)
    requested_by = change.requested_by or actor()
    rec = records()
    row = rec.add_change_request(
        title=change.title,
        description=change.description,
        services=change.services,
        environments=change.environments,
        implementation_plan=change.implementation_plan,
        rollback_plan=change.rollback_plan,
        requested_by=requested_by,
        state="requested",
        details={"version": change.version, "emergency": change.emergency},
    )
    cr_id = row.id
    subject = f"change-request/{cr_id}"
    audit("change.requested", subject, title=change.title, version=change.version)

    # impact assessment
    now = datetime.now(UTC)
    touched = [h.name for e in change.environments for h in cfg.environment(e).hosts]
    total = sum(len(e.hosts) for e in cfg.environments.values())
    frozen, extra = False, 0
    for env in change.environments:
        decision = check_freeze(
            cfg.environment(env).policy.freeze_windows, now, emergency=change.emergency
        )
        if not decision.allowed:
            return _close(cr_id, "closed", "refused", reason=decision.reason)
        frozen = frozen or decision.frozen
        extra = max(extra, decision.extra_approvers)
    risk = assess_risk(
        environments=change.environments,
        hosts_touched=len(touched),
        hosts_total=total,
        services=len(change.services),
        at=now,
        frozen=frozen,
    )
    impact = (
        f"## Impact of change request #{cr_id}: {change.title}\n\n"
        f"Services: {', '.join(change.services)} → `{change.version}`; environments: "
        f"{', '.join(change.environments)}; hosts touched: {len(touched)}/{total} "
        f"({', '.join(touched)}).\n\n{risk.to_markdown()}\n\n"
        f"**Implementation plan:** {change.implementation_plan}\n\n"
        f"**Rollback plan:** {change.rollback_plan}"
    )
    create_markdown_artifact(impact, key="change-impact", description=f"Impact of {subject}")
    rec.update_change_request(
        cr_id,
        risk=risk.level,
        state="assessed",
        details={**row.details, "risk_score": risk.score, "hosts": touched},
    )
    audit("change.assessed", subject, risk=risk.level, score=risk.score, hosts=touched)

    # approval: quorum follows the risk; the riskiest environment's approvers decide
    riskiest = "production" if "production" in change.environments else change.environments[-1]
    policy = cfg.environment(riskiest).policy
    needed = required_approvals(
        policy_quorum=0, approval_required=False, risk_quorum=risk.quorum, emergency=extra > 0
    )
    outcome = request_approval(
        subject=subject,
        summary_markdown=impact,
        policy=policy,
        requested_by=requested_by,
        required=needed,
    )
    if not outcome.approved:
        return _close(cr_id, "closed", "rejected", approval=outcome.summary())
    rec.update_change_request(
        cr_id,
        state="approved",
        details={
            **rec.change_request(cr_id).details,
            "approved_by": list(outcome.approved_by),
            "approval": outcome.summary(),
        },
    )
    audit("change.approved", subject, approved_by=list(outcome.approved_by))

    # implementation: one deploy-pipeline subflow per service
    target = "production" if "production" in change.environments else change.environments[-1]
    rec.update_change_request(cr_id, state="implementing")
    done: list[tuple[str, dict[str, Any]]] = []
    for service in change.services:
        state = deploy_pipeline(
            DeployRequest(
                service=service,
                version=change.version,
                environment=target,
                change_request_id=cr_id,
                requested_by=requested_by,
                emergency=change.emergency,
            ),
            return_state=True,
        )
        if state.is_completed():
            done.append((service, state.result()))
            continue
        error = str(state.result(raise_on_failure=False))[:500]
        logger.error("implementation of %s failed: %s", service, error)
        undone = _roll_back_services(done, change.version)
        _close(cr_id, "closed", "rolled_back", error=error, rolled_back=undone)
        notify("warning", f"Change request #{cr_id} rolled back", error)
        raise PolicyViolation(f"change request #{cr_id} failed and was rolled back: {error}")
    return _close(
        cr_id, "closed", "implemented", services=[s for s, _ in done], version=change.version
    )


def _roll_back_services(done: list[tuple[str, dict[str, Any]]], version: str) -> list[str]:
    """The rollback procedure for services this change already deployed."""
    cfg = ops_config()
    lines = []
    for service, result in done:
        for env_name, env in cfg.environments.items():
            for host in env.hosts:
                if host.name in result.get("previous", {}):
                    previous = result["previous"][host.name]
                    lines.append(rollback_host(service, env_name, host.name, previous, version))
    close_connections()
    return lines
