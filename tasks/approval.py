"""The shared approval step: pause the flow run with a typed form, check answers against policy.

Used by deploy-pipeline, change-request, backup restore and incident containment. Each answer
is checked by :mod:`kmpops.plans.approval` (allowed approver, four-eyes, distinct approvers,
approver token) and recorded (approvals store + audit chain) whether it counts or not. A refused
answer does not end the wait: the run pauses again for the time left. The stored form answer
(which carries the token) is deleted from the Prefect API as soon as it has been read.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Literal

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from kmpops.config import Policy
from kmpops.plans.approval import (
    ApprovalAnswer,
    ApprovalOutcome,
    ApprovalTally,
    TokenBook,
    apply_answer,
    check_answer,
    parse_token_book,
)
from kmpops.records import Records
from tasks.common import audit, records, run_id, secret

__all__ = ["ApprovalForm", "ApprovalOutcome", "request_approval", "resume_after_timeout"]

POLL_INTERVAL_S = 1


class ApprovalForm(RunInput):
    """The approval form shown in the Prefect UI (and sent by ``kmpops approve``)."""

    decision: Literal["approve", "reject"] = Field(
        default="reject", description="approve or reject the change"
    )
    approver: str = Field(default="", description="your name, as listed in the policy")
    reason: str = Field(default="", description="why (recorded in the audit chain)")
    approver_token: str = Field(
        default="", description="your approver token", json_schema_extra={"format": "password"}
    )


def _token_book(policy: Policy) -> TokenBook | None:
    if policy.approver_tokens is None:
        return None
    return parse_token_book(secret(policy.approver_tokens))


def _forget_answers(flow_run_id: str | None) -> None:
    """Delete stored form answers of this run (they hold the approver token)."""
    if not flow_run_id:
        return
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        from uuid import UUID

        for item in client.filter_flow_run_input(
            flow_run_id=UUID(flow_run_id), key_prefix="paused-", limit=100
        ):
            if item.key.endswith("-response"):
                client.delete_flow_run_input(flow_run_id=UUID(flow_run_id), key=item.key)


def _description(summary: str, tally: ApprovalTally, policy: Policy, requested_by: str) -> str:
    lines = [
        summary,
        "",
        "---",
        f"**Approval needed:** {len(tally.approved_by)}/{tally.required} distinct approvals "
        f"from {', '.join(policy.approvers) or '(nobody listed)'}"
        + (f"; not {requested_by} (four-eyes)" if policy.four_eyes else "")
        + ".",
    ]
    if tally.approved_by:
        lines.append(f"Approved so far by: {', '.join(tally.approved_by)}.")
    if tally.refused:
        last = tally.refused[-1]
        lines.append(f"Last answer refused: {last[0] or '(no name)'} — {last[1]}.")
    return "\n".join(lines)


def request_approval(
    *,
    subject: str,
    summary_markdown: str,
    policy: Policy,
    requested_by: str,
    timeout_s: float | None = None,
    required: int | None = None,
) -> ApprovalOutcome:
    """Pause the current flow run until ``required`` (default ``policy.quorum``) distinct valid
    approvals arrive, a valid rejection arrives, or the time runs out.

    Must be called from a flow (not a task). ``timeout_s`` defaults to the policy's
    ``approval_timeout``; on timeout ``policy.timeout_outcome`` applies. ``required=0`` returns
    ``not_required`` at once (still recorded). Never raises for a refusal: the caller decides
    what a rejected outcome means (usually PolicyViolation + rollback).
    """
    logger = get_run_logger()
    rec = records()
    needed = policy.quorum if required is None else required
    flow_run_id = run_id()
    request = rec.add_approval(
        subject=subject,
        run_id=flow_run_id,
        requested_by=requested_by,
        summary=summary_markdown,
        outcome="pending",
        details={"required": needed, "approvers": list(policy.approvers), "kind": "request"},
    )
    audit("approval.requested", subject, required=needed, requested_by=requested_by)
    tally = ApprovalTally(required=needed)
    if needed <= 0:
        outcome = ApprovalOutcome(subject, "not_required", True, 0, reason="no approval needed")
        return _finish(rec, request.id, outcome)
    book = _token_book(policy)
    wait_s = policy.approval_timeout.total_seconds() if timeout_s is None else timeout_s
    deadline = time.monotonic() + wait_s
    timed_out = False
    while not tally.done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        form = ApprovalForm.with_initial_data(
            description=_description(summary_markdown, tally, policy, requested_by),
            decision="reject",
        )
        try:
            answer_form = pause_flow_run(
                wait_for_input=form, timeout=max(1, round(remaining)), poll_interval=POLL_INTERVAL_S
            )
        except FlowPauseTimeout:
            resume_after_timeout()
            timed_out = True
            break
        _forget_answers(flow_run_id)
        answer = ApprovalAnswer(
            decision=answer_form.decision,
            approver=answer_form.approver.strip(),
            reason=answer_form.reason,
            token=answer_form.approver_token,
        )
        refusal = check_answer(
            answer,
            approvers=policy.approvers,
            requested_by=requested_by,
            four_eyes=policy.four_eyes,
            tally=tally,
            token_book=book,
        )
        apply_answer(tally, answer, refusal)
        verdict = (
            f"refused:{refusal}"
            if refusal
            else {"approve": "approved", "reject": "rejected"}[answer.decision]
        )
        rec.add_approval(
            subject=subject,
            run_id=flow_run_id,
            requested_by=requested_by,
            summary="",
            decision=answer.decision,
            approver=answer.approver,
            reason=answer.reason,
            decided_at=datetime.now(UTC),
            outcome=verdict,
            details={"kind": "answer", "request_id": request.id},
        )
        audit(
            "approval.answer",
            subject,
            approver=answer.approver,
            decision=answer.decision,
            reason=answer.reason,
            verdict=verdict,
        )
        if refusal:
            logger.warning("approval answer from %r refused: %s", answer.approver, refusal)
        else:
            logger.info("approval answer from %s: %s", answer.approver, answer.decision)
    return _finish(rec, request.id, _outcome(subject, tally, policy, timed_out))


def _outcome(
    subject: str, tally: ApprovalTally, policy: Policy, timed_out: bool
) -> ApprovalOutcome:
    common = {
        "subject": subject,
        "required": tally.required,
        "approved_by": tuple(tally.approved_by),
        "rejected_by": tally.rejected_by,
        "refused": tuple(tally.refused),
    }
    if tally.approved:
        return ApprovalOutcome(status="approved", approved=True, **common)
    if tally.rejected:
        why = (
            f"rejected by {tally.rejected_by}"
            if tally.rejected_by
            else f"{len(tally.refused)} refused answers"
        )
        return ApprovalOutcome(status="rejected", approved=False, reason=why, **common)
    assert timed_out
    approve = policy.timeout_outcome == "approve"
    return ApprovalOutcome(
        status="timed_out",
        approved=approve,
        reason=f"no decision in time; policy timeout outcome: {policy.timeout_outcome}",
        **common,
    )


def _finish(rec: Records, request_id: int, outcome: ApprovalOutcome) -> ApprovalOutcome:
    rec.update_approval(
        request_id,
        outcome=outcome.status
        if outcome.status != "timed_out"
        else ("timed_out:approve" if outcome.approved else "timed_out:reject"),
        decided_at=datetime.now(UTC),
        approver=", ".join(outcome.approved_by) or None,
        details={
            "kind": "request",
            "required": outcome.required,
            "approved_by": list(outcome.approved_by),
            "rejected_by": outcome.rejected_by,
            "refused": [list(r) for r in outcome.refused],
        },
    )
    audit(
        "approval.outcome",
        outcome.subject,
        status=outcome.status,
        approved=outcome.approved,
        approved_by=list(outcome.approved_by),
        reason=outcome.reason,
    )
    return outcome


def resume_after_timeout() -> None:
    """Put the current flow run back to Running after a pause timed out.

    ``pause_flow_run`` raises FlowPauseTimeout but leaves the run Paused on the server, and the
    server fails an expired pause ("The flow was paused and never resumed") as soon as anything
    touches the run. An escalation timeout is an expected outcome, not a failure, so the run is
    forced back to Running (only from that paused/expired state, never from another one)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Running

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(ctx.flow_run.id).state
        if state is None or state.is_running():
            return
        expired = state.is_failed() and "never resumed" in (state.message or "")
        if state.is_paused() or expired:
            client.set_flow_run_state(ctx.flow_run.id, Running(), force=True)
