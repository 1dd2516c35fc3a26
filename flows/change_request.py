"""change-request: the guide's change management, from request to close.

request -> impact assessment (hosts and services touched, risk from environment, blast radius,
time and freeze windows) -> approval whose quorum follows the risk (low 0, medium 1, high 2; a
freeze override adds one) -> implementation by running deploy-pipeline as a subflow per service
-> on failure the rollback procedure (deploy-pipeline rolls back its own hosts; services already
deployed by this change are put back on their previous releases) -> closed with its outcome.
Every state is in the records store (change_requests) and the audit chain.

Identity and binding: the requester confirms the change with their own token (the request's
first answer) even when the risk needs no approver; the record keeps that authenticated
requester, the approvers, the run id and the config digest. A deploy may use the change in
place of its own approval only if it is what the change names (service, version, environment),
started by this very run, on the same config, and only once per service and environment (a
consumption record; see ``tasks.approval.consume_change_request``).

Ends: a change that was implemented ends in state ``implemented``; a failed implementation that
was rolled back, ``rolled_back``; anything else (the flow itself broke, or its process died)
``failed`` — the in-process hooks close it, and ``change-request-recover`` closes a change whose
run crashed from the records (which deploys consumed it, and how they ended).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, field_validator

from flows.deploy_pipeline import DeployRequest, deploy_pipeline
from kmpops import shellsafe
from kmpops.errors import PolicyViolation
from kmpops.plans.approval import (
    DeployEnd,
    change_request_recovery_outcome,
    is_service_identity,
    required_approvals,
)
from kmpops.plans.freeze import check_freeze
from kmpops.plans.risk import assess_risk
from kmpops.release import validate_version
from tasks.approval import request_approval, requester_for_run
from tasks.artifacts import create_markdown_artifact
from tasks.common import audit, config_digest, notify, ops_config, records, run_id
from tasks.context import in_run_context, run_context
from tasks.deploy import rollback_host


class ChangeRequestInput(BaseModel):
    """A change request as an operator files it. No secrets here."""

    title: str = Field(min_length=3, max_length=200, description="what changes")
    description: str = Field(default="", description="why")
    services: list[str] = Field(min_length=1, description="services touched")
    environments: list[str] = Field(min_length=1, description="environments touched")
    version: str = Field(description="release version to deploy")
    implementation_plan: str = Field(default="deploy-pipeline per service")
    rollback_plan: str = Field(default="deploy-pipeline rollback to each host's previous release")
    requested_by: str = Field(
        default="",
        description="who asks; they confirm with their own token first (empty: whoever confirms)",
    )
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
@in_run_context
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
    requested_by = requester_for_run(change.requested_by)
    rec = records()
    row = rec.add_change_request(
        title=change.title,
        description=change.description,
        services=change.services,
        environments=change.environments,
        implementation_plan=change.implementation_plan,
        rollback_plan=change.rollback_plan,
        requested_by=requested_by or "(to be confirmed)",
        state="requested",
        details={
            "version": change.version,
            "emergency": change.emergency,
            "run_id": run_id(),
            "config_digest": config_digest(),
        },
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
        plan={
            "services": list(change.services),
            "version": change.version,
            "environments": list(change.environments),
            "hosts": touched,
        },
        confirm_requester=True,
    )
    if not outcome.approved or outcome.requester is None:
        return _close(cr_id, "closed", "rejected", approval=outcome.summary())
    rec.update_change_request(
        cr_id,
        state="approved",
        requested_by=outcome.requester,
        details={
            **rec.change_request(cr_id).details,
            "approved_by": list(outcome.approved_by),
            "requester": outcome.requester,
            "approval": outcome.summary(),
            "plan_digest": outcome.plan_digest,
        },
    )
    audit(
        "change.approved",
        subject,
        approved_by=list(outcome.approved_by),
        requester=outcome.requester,
        plan_digest=outcome.plan_digest,
    )

    # implementation: one deploy-pipeline subflow per service
    target = "production" if "production" in change.environments else change.environments[-1]
    rec.update_change_request(cr_id, state="implementing")
    done: list[tuple[str, dict[str, Any]]] = []
    try:
        for service in change.services:
            state = deploy_pipeline(
                DeployRequest(
                    service=service,
                    version=change.version,
                    environment=target,
                    change_request_id=cr_id,
                    # a service identity is the run's own, never a parameter
                    requested_by=""
                    if is_service_identity(outcome.requester)
                    else outcome.requester,
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
            _close(cr_id, "rolled_back", "rolled_back", error=error, rolled_back=undone)
            notify("warning", f"Change request #{cr_id} rolled back", error)
            raise PolicyViolation(f"change request #{cr_id} failed and was rolled back: {error}")
    except BaseException as exc:
        if records().change_request(cr_id).state == "implementing":  # not closed above
            _close(cr_id, "failed", "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    return _close(
        cr_id, "implemented", "implemented", services=[s for s, _ in done], version=change.version
    )


def _roll_back_services(done: list[tuple[str, dict[str, Any]]], version: str) -> list[str]:
    """The rollback procedure for services this change already deployed."""
    ctx = run_context()
    lines = []
    for service, result in done:
        resolved = ctx.service(service)
        for env_name, env in ctx.config.environments.items():
            for host in env.hosts:
                if host.name in result.get("previous", {}):
                    previous = result["previous"][host.name]
                    lines.append(rollback_host(resolved, env_name, host, previous, version))
    return lines


def _deploy_ends(cr_id: int) -> dict[str, DeployEnd]:
    """How each deploy this change started ended, from the audit trail (per service)."""
    rec = records()
    ends: dict[str, DeployEnd] = {}
    for event in rec.audit_events(action="deploy.requested"):
        details = event.details or {}
        if details.get("change_request_id") != cr_id or details.get("dry_run") or not event.run_id:
            continue
        service = event.subject.split("@", 1)[0]
        actions = {e.action for e in rec.audit_events(run_id=event.run_id)}
        if "deploy.completed" in actions:
            end: DeployEnd = "completed"
        elif actions & {"deploy.rolled_back", "deploy.recovered"}:
            end = "rolled_back"
        elif "deploy.activating" in actions:
            end = "unfinished"
        else:
            end = "not_started"
        if ends.get(service) != "completed":
            ends[service] = end
    return ends


@flow(name="change-request-recover")
def change_request_recover(
    change_request_id: int | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Close change requests whose run died while they were open (approved or implementing),
    from the records: ``implemented``, ``rolled_back`` or ``failed`` (see
    :func:`kmpops.plans.approval.change_request_recovery_outcome`).

    Without ``change_request_id`` every open change whose run is in a final state is closed.
    A change whose run is still shown Running is left alone unless ``force`` (an operator
    knows its process is gone); asked for by id, it is refused with PolicyViolation. A change
    with a deploy still half-done is left open unless ``force``: deploy-recover rolls that
    deploy back and then closes the change (:func:`close_after_deploy_recovery`). Started by
    the server when a change-request run turns Crashed. Changes nothing on hosts; idempotent.
    """
    from tasks.deploy import read_flow_run

    rec = records()
    if change_request_id is not None:
        rows = [rec.change_request(change_request_id)]
    else:
        rows = rec.change_requests(states=("requested", "assessed", "approved", "implementing"))
    closed = []
    for row in rows:
        if row.state not in ("requested", "assessed", "approved", "implementing"):
            continue  # already ended
        owner = (row.details or {}).get("run_id")
        if owner and not force:
            info = read_flow_run(owner)
            if not info["final"]:
                if change_request_id is not None:
                    raise PolicyViolation(
                        f"change request #{row.id}: its run {owner} is {info['state_name']}; "
                        "if its process is gone, run again with force=True"
                    )
                continue
        ends = _deploy_ends(row.id)
        if "unfinished" in ends.values() and not force:
            # deploy-recover rolls the half-done deploy back, then closes this change
            get_run_logger().info(
                "change request #%s left open: a deploy is unfinished (%s); deploy-recover "
                "closes it once the hosts are back",
                row.id,
                ", ".join(s for s, e in ends.items() if e == "unfinished"),
            )
            continue
        outcome = change_request_recovery_outcome(row.services or [], ends)
        closed.append(
            _close(row.id, outcome, outcome, recovered_from_run=owner, deploys=dict(ends))
        )
        if outcome == "failed":
            notify(
                "critical",
                f"Change request #{row.id} ended failed after its run died",
                f"deploys: {ends}; check the hosts (deploy-recover) and close it by hand",
            )
    return closed


def close_after_deploy_recovery(change_request_ids: list[int]) -> list[dict[str, Any]]:
    """After deploy-recover put a crashed deploy's hosts back: close the change requests that
    deploy belonged to, if their own run has ended too (else their own Crashed trigger will).
    Never raises: a change left open is logged."""
    closed: list[dict[str, Any]] = []
    for cr_id in sorted(set(change_request_ids)):
        state = change_request_recover(change_request_id=cr_id, return_state=True)
        if state.is_completed():
            closed += state.result()
        else:
            get_run_logger().warning("change request #%s not closed yet: %s", cr_id, state.message)
    return closed
