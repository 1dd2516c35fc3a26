"""The shared approval step: pause the flow run with a typed form, check answers against policy.

Used by deploy-pipeline, change-request, backup restore, access changes, break-glass and incident
containment. Each answer is checked by :mod:`kmpops.plans.approval` and recorded (approvals store
+ audit chain) whether it counts or not. A refused answer does not end the wait: the run pauses
again for the time left.

Identity: a request is filed by a requester that is either the run's service identity (a
scheduled or automation-triggered run, see ``tasks.common.run_service_identity``) or a person
who must confirm it first — the request's first pause waits for ``decision: confirm`` with the
requester's own token (the same form in the UI, ``kmpops approve RUN --decision confirm`` on the
command line). Only then can approvers answer, and four-eyes compares them with that
authenticated requester, never with a free-text name. A confirmation is remembered for the rest
of the run.

Binding: the request's plan digest covers what changes where (``plan``), the summary shown and
the run's config digest; every answer must carry the request code (run id + plan digest) shown in
the form, so an answer captured from one run is refused on any other.

Tokens: the stored form answer (which carries the token) is read raw from the Prefect API,
deleted, and its absence checked before the answer is judged; if it cannot be removed the answer
is refused (``answer_not_removed``) — fail closed. Without a token book every request is refused
at once (``no_token_book``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from kmpops.config import Policy
from kmpops.errors import PolicyViolation
from kmpops.plans.approval import (
    ApprovalAnswer,
    ApprovalOutcome,
    ApprovalTally,
    ChangeRequestFacts,
    Refusal,
    TokenBook,
    apply_answer,
    change_request_refusal,
    check_answer,
    is_service_identity,
    parse_token_book,
    plan_digest,
    request_code,
    requester_claim_refusal,
)
from kmpops.records import Records
from tasks.common import audit, config_digest, records, run_id, run_service_identity, secret

__all__ = [
    "ApprovalForm",
    "ApprovalOutcome",
    "change_request_refusal_for",
    "consume_change_request",
    "parent_flow_run_id",
    "request_approval",
    "requester_for_run",
    "resume_after_timeout",
]

POLL_INTERVAL_S = 1

#: run id -> the requester confirmed in that run (a run asks its requester once)
_confirmed: dict[str, str] = {}


class ApprovalForm(RunInput):
    """The approval form shown in the Prefect UI (and sent by ``kmpops approve``)."""

    decision: Literal["approve", "reject", "confirm"] = Field(
        default="reject",
        description="approve or reject the change; the requester answers confirm first",
    )
    approver: str = Field(default="", description="your name, as listed in the token book")
    reason: str = Field(default="", description="why (recorded in the audit chain)")
    approver_token: str = Field(
        default="", description="your personal token", json_schema_extra={"format": "password"}
    )
    request_code: str = Field(
        default="", description="the request code shown above (binds your answer to this run)"
    )


def requester_for_run(claim: str) -> str:
    """Who files this run's requests: the run's service identity when the scheduler or an
    automation started it, else the person named by ``claim`` ("" = whoever confirms).

    Raises PolicyViolation for a claim of a service identity (those come from provenance)."""
    service = run_service_identity()
    if service is not None:
        return service
    why = requester_claim_refusal(claim)
    if why:
        raise PolicyViolation(why)
    return claim.strip()


def _token_book(policy: Policy) -> TokenBook | None:
    if policy.approver_tokens is None:
        return None
    return parse_token_book(secret(policy.approver_tokens))


def take_answer(flow_run_id: str | None) -> tuple[dict[str, Any] | None, bool]:
    """Read the stored form answer raw, delete it, check it is gone.

    Returns (the newest answer or None, removed). ``removed`` is False when the delete failed or
    an answer is still stored afterwards — the caller refuses the answer (fail closed)."""
    if not flow_run_id:
        return None, False
    run = UUID(flow_run_id)
    try:
        with get_client(sync_client=True) as client:
            items = [
                i
                for i in client.filter_flow_run_input(
                    flow_run_id=run, key_prefix="paused-", limit=100, exclude_keys=set()
                )
                if i.key.endswith("-response")
            ]
            items.sort(key=lambda i: i.created or datetime.min.replace(tzinfo=UTC))
            raw = items[-1].decoded_value if items else None
            for item in items:
                client.delete_flow_run_input(flow_run_id=run, key=item.key)
            left = [
                i
                for i in client.filter_flow_run_input(
                    flow_run_id=run, key_prefix="paused-", limit=100, exclude_keys=set()
                )
                if i.key.endswith("-response")
            ]
    except Exception:  # any failure to remove the token means: not removed
        return None, False
    return (raw if isinstance(raw, dict) else None), not left


def _facts_markdown(facts: Mapping[str, Any], digest: str, code: str) -> list[str]:
    lines = ["", "| what you answer for | |", "| --- | --- |"]
    for key, value in facts.items():
        if key == "summary_sha256":
            continue
        text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        lines.append(f"| {key.replace('_', ' ')} | `{text}` |")
    lines += [f"| plan digest | `{digest}` |", f"| **request code** | `{code}` |"]
    return lines


def _description(
    summary: str,
    tally: ApprovalTally,
    policy: Policy,
    facts: Mapping[str, Any],
    digest: str,
    code: str,
) -> str:
    lines = [summary, "", "---", *_facts_markdown(facts, digest, code), ""]
    if tally.requester is None:
        who = tally.claimed_requester or "the person who asked for this change"
        lines.append(
            f"**Waiting for the requester ({who}) to confirm:** answer `confirm` with your own "
            "name and token (`kmpops approve RUN --decision confirm`). Approvals count only "
            "after that."
        )
    else:
        lines.append(f"**Requested by:** {tally.requester} (authenticated).")
    lines.append(
        f"**Approval needed:** {len(tally.approved_by)}/{tally.required} distinct approvals "
        f"from {', '.join(policy.approvers) or '(nobody listed)'}"
        + (f"; not {tally.requester or 'the requester'} (four-eyes)" if policy.four_eyes else "")
        + "."
    )
    if tally.approved_by:
        lines.append(f"Approved so far by: {', '.join(tally.approved_by)}.")
    if tally.refused:
        last = tally.refused[-1]
        lines.append(f"Last answer refused: {last[0] or '(no name)'} — {last[1]}.")
    return "\n".join(lines)


def _answer_from(raw: Mapping[str, Any] | None, fallback: ApprovalForm) -> ApprovalAnswer:
    """The answer as sent (raw), not as defaulted by the form: a missing request code stays
    missing and is refused."""
    data = raw if raw is not None else {}
    decision = data.get("decision", fallback.decision)
    if decision not in ("approve", "reject", "confirm"):
        decision = "reject"
    return ApprovalAnswer(
        decision=decision,
        approver=str(data.get("approver", fallback.approver)).strip(),
        reason=str(data.get("reason", "")),
        token=str(data.get("approver_token", "")),
        request_code=str(data.get("request_code", "")) if raw is not None else "",
    )


def request_approval(
    *,
    subject: str,
    summary_markdown: str,
    policy: Policy,
    requested_by: str,
    timeout_s: float | None = None,
    required: int | None = None,
    plan: Mapping[str, Any] | None = None,
    confirm_requester: bool = False,
) -> ApprovalOutcome:
    """Pause the current flow run until its requester is authenticated and ``required``
    (default ``policy.quorum``) distinct valid approvals arrive, a valid rejection arrives, or
    the time runs out.

    ``requested_by`` is a service identity (the run's own, from :func:`requester_for_run`) or
    the name of the person who must confirm ("" = whoever confirms with their token). ``plan``
    is what changes where (service, version, environment, hosts, artifact source and sha256...):
    shown in the form, kept in the record and, with the summary and the config digest, hashed
    into the plan digest every answer is bound to. Must be called from a flow (not a task).
    ``timeout_s`` defaults to the policy's ``approval_timeout``; on timeout
    ``policy.timeout_outcome`` applies. ``required=0`` returns ``not_required`` at once (still
    recorded) unless ``confirm_requester``: then it still waits for the requester to confirm
    (a change request is a human act even when nobody needs to approve it). Never raises for
    a refusal: the caller decides what a rejected outcome means
    (usually PolicyViolation + rollback).
    """
    logger = get_run_logger()
    rec = records()
    needed = policy.quorum if required is None else required
    flow_run_id = run_id()
    facts: dict[str, Any] = {
        "subject": subject,
        **dict(plan or {}),
        "config_digest": config_digest(),
        "summary_sha256": hashlib.sha256(summary_markdown.encode()).hexdigest(),
    }
    digest = plan_digest(facts)
    code = request_code(flow_run_id, digest)
    pre = requested_by if is_service_identity(requested_by) else None
    pre = pre or _confirmed.get(flow_run_id or "")
    if pre and not is_service_identity(pre) and requested_by and pre != requested_by:
        pre = None  # confirmed as someone else earlier in this run: ask again
    tally = ApprovalTally(required=needed, requester=pre, claimed_requester=requested_by)
    asked: dict[str, Any] = {
        "approvers": list(policy.approvers),
        "plan": facts,
        "plan_digest": digest,
        "config_digest": facts["config_digest"],
        "request_code": code,
    }
    request = rec.add_approval(
        subject=subject,
        run_id=flow_run_id,
        requested_by=pre or requested_by or "(to be confirmed)",
        summary=summary_markdown,
        outcome="pending",
        details={**asked, "required": needed, "kind": "request", "requester": pre},
    )
    audit(
        "approval.requested",
        subject,
        required=needed,
        requested_by=pre or requested_by,
        plan_digest=digest,
        config_digest=facts["config_digest"],
    )
    must_confirm = confirm_requester and tally.requester is None
    if needed <= 0 and not must_confirm:
        outcome = ApprovalOutcome(
            subject,
            "not_required",
            True,
            0,
            reason="no approval needed",
            plan_digest=digest,
            requester=tally.requester,
        )
        return _finish(rec, request.id, outcome, asked)
    book = _token_book(policy)
    if book is None:
        tally.refused.append(("", "no_token_book"))
        outcome = ApprovalOutcome(
            subject,
            "rejected",
            False,
            needed,
            refused=tuple(tally.refused),
            reason="no token book configured: answers cannot be authenticated",
            plan_digest=digest,
        )
        return _finish(rec, request.id, outcome, asked)
    wait_s = policy.approval_timeout.total_seconds() if timeout_s is None else timeout_s
    deadline = time.monotonic() + wait_s
    timed_out = False
    while not tally.done or (must_confirm and tally.requester is None and not tally.rejected):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        confirming = tally.requester is None
        form = ApprovalForm.with_initial_data(
            description=_description(summary_markdown, tally, policy, facts, digest, code),
            decision="confirm" if confirming else "reject",
            request_code=code,
        )
        try:
            answer_form = pause_flow_run(
                wait_for_input=form, timeout=max(1, round(remaining)), poll_interval=POLL_INTERVAL_S
            )
        except FlowPauseTimeout:
            resume_after_timeout()
            timed_out = True
            break
        raw, removed = take_answer(flow_run_id)
        answer = _answer_from(raw, answer_form)
        refusal: Refusal | None
        if not removed:
            refusal = "answer_not_removed"
        else:
            refusal = check_answer(
                answer,
                approvers=policy.approvers,
                four_eyes=policy.four_eyes,
                tally=tally,
                token_book=book,
                expected_code=code,
            )
        if refusal is None:
            spent = f"answer:{code}:{answer.approver}:{answer.decision == 'confirm'}"
            if not rec.consume(spent, kind="approval-answer", run_id=flow_run_id):
                refusal = "duplicate_approver"
        apply_answer(tally, answer, refusal)
        if refusal is None and answer.decision == "confirm" and flow_run_id:
            _confirmed[flow_run_id] = answer.approver
        verdict = (
            f"refused:{refusal}"
            if refusal
            else {"approve": "approved", "reject": "rejected", "confirm": "confirmed"}[
                answer.decision
            ]
        )
        rec.add_approval(
            subject=subject,
            run_id=flow_run_id,
            requested_by=tally.requester or requested_by,
            summary="",
            decision=answer.decision,
            approver=answer.approver,
            reason=answer.reason,
            decided_at=datetime.now(UTC),
            outcome=verdict,
            details={
                "kind": "answer",
                "request_id": request.id,
                "plan_digest": digest,
                "request_code": code,
            },
        )
        audit(
            "approval.answer",
            subject,
            approver=answer.approver,
            decision=answer.decision,
            reason=answer.reason,
            verdict=verdict,
            plan_digest=digest,
        )
        if refusal:
            logger.warning("approval answer from %r refused: %s", answer.approver, refusal)
        else:
            logger.info("approval answer from %s: %s", answer.approver, answer.decision)
    unconfirmed = must_confirm and tally.requester is None
    outcome = _outcome(subject, tally, policy, timed_out, digest, unconfirmed=unconfirmed)
    return _finish(rec, request.id, outcome, asked)


def _outcome(
    subject: str,
    tally: ApprovalTally,
    policy: Policy,
    timed_out: bool,
    digest: str,
    *,
    unconfirmed: bool = False,
) -> ApprovalOutcome:
    common: dict[str, Any] = {
        "subject": subject,
        "requester": tally.requester,
        "plan_digest": digest,
        "required": tally.required,
        "approved_by": tuple(tally.approved_by),
        "rejected_by": tally.rejected_by,
        "refused": tuple(tally.refused),
    }
    if tally.approved and not unconfirmed:
        return ApprovalOutcome(status="approved", approved=True, **common)
    if tally.rejected:
        why = (
            f"rejected by {tally.rejected_by}"
            if tally.rejected_by
            else f"{len(tally.refused)} refused answers"
        )
        return ApprovalOutcome(status="rejected", approved=False, reason=why, **common)
    assert timed_out
    # a timeout may approve per policy, but never a request nobody authenticated
    approve = policy.timeout_outcome == "approve" and not unconfirmed
    return ApprovalOutcome(
        status="timed_out",
        approved=approve,
        reason=f"no decision in time; policy timeout outcome: {policy.timeout_outcome}",
        **common,
    )


def _finish(
    rec: Records, request_id: int, outcome: ApprovalOutcome, asked: Mapping[str, Any]
) -> ApprovalOutcome:
    """Close the request record: what was asked (``asked``: plan, digests, code) and the
    outcome, so the record keeps what the approvers saw next to who decided."""
    rec.update_approval(
        request_id,
        outcome=outcome.status
        if outcome.status != "timed_out"
        else ("timed_out:approve" if outcome.approved else "timed_out:reject"),
        decided_at=datetime.now(UTC),
        approver=", ".join(outcome.approved_by) or None,
        **({"requested_by": outcome.requester} if outcome.requester else {}),
        details={
            **asked,
            "kind": "request",
            "required": outcome.required,
            "approved_by": list(outcome.approved_by),
            "rejected_by": outcome.rejected_by,
            "refused": [list(r) for r in outcome.refused],
            "requester": outcome.requester,
            "plan_digest": outcome.plan_digest,
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


def parent_flow_run_id() -> str | None:
    """The id of the flow run that started the current one as a subflow, or None."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    parent_task = ctx.flow_run.parent_task_run_id if ctx and ctx.flow_run else None
    if parent_task is None:
        return None
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(parent_task)
    return str(task_run.flow_run_id) if task_run.flow_run_id else None


def _cr_facts(cr_id: int) -> ChangeRequestFacts:
    from kmpops.errors import NotFound

    try:
        row = records().change_request(cr_id)
    except NotFound:
        raise PolicyViolation(f"change request #{cr_id} does not exist") from None
    details = row.details or {}
    return ChangeRequestFacts(
        id=row.id,
        state=row.state,
        services=tuple(row.services or ()),
        environments=tuple(row.environments or ()),
        version=str(details.get("version", "")),
        run_id=details.get("run_id"),
        approved_by=tuple(details.get("approved_by", ())),
        requester=details.get("requester"),
        config_digest=details.get("config_digest"),
    )


def _cr_use_key(cr_id: int, service: str, environment: str) -> str:
    return f"change-request:{cr_id}:{service}:{environment}"


def change_request_refusal_for(
    cr_id: int, service: str, version: str, environment: str, config_digest: str, needed: int = 0
) -> str | None:
    """Why this run may not deploy ``service`` ``version`` to ``environment`` under change
    request ``cr_id`` (see :func:`kmpops.plans.approval.change_request_refusal`), or None.
    Reads only: the use is recorded by :func:`consume_change_request`."""
    return change_request_refusal(
        _cr_facts(cr_id),
        service=service,
        version=version,
        environment=environment,
        parent_run_id=parent_flow_run_id(),
        config_digest=config_digest,
        needed=needed,
        already_used=records().consumption(_cr_use_key(cr_id, service, environment)) is not None,
    )


def consume_change_request(
    cr_id: int, req: Any, environment: str, config_digest: str, needed: int, *, subject: str
) -> None:
    """Spend change request ``cr_id`` for ``req.service`` in ``environment`` in place of an
    approval: checked again (state, scope, own run, config, approvers) and recorded once — a
    second use, by this run or any other, is refused. Raises PolicyViolation when refused
    (audited as ``deploy.refused``); nothing to undo on success but the record."""
    why = change_request_refusal_for(
        cr_id, req.service, req.version, environment, config_digest, needed
    )
    if why is None and not records().consume(
        _cr_use_key(cr_id, req.service, environment),
        kind="change-request",
        run_id=run_id(),
        details={"version": req.version, "config_digest": config_digest},
    ):
        why = f"change request #{cr_id} was already used for {req.service} in {environment}"
    if why:
        audit("deploy.refused", subject, reason=why)
        raise PolicyViolation(why)
    audit(
        "change.consumed",
        f"change-request/{cr_id}",
        service=req.service,
        environment=environment,
        version=req.version,
    )
