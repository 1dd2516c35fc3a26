"""Answer a paused approval from outside the run (`kmpops approve RUN_ID`) over the REST API.

No Prefect import: a plain ``POST /flow_runs/{id}/resume`` with the same input the UI form sends
(``decision``, ``approver``, ``reason``, ``approver_token``, ``request_code``). The request code
binds the answer to this run and the plan it shows; unless given, it is read from the paused
run's form (``pending_request``), so an answer is made for the run it is sent to. The server
validates the input against the form's schema; the paused flow then checks the answer against
policy (authenticated requester, allowed approver, four-eyes, quorum, token, request code) and
records it. The token travels only in the request body; it is never logged or echoed in an
error. ``decision="confirm"`` is the requester authenticating the request they filed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

import httpx

from kmpops.errors import ConnectorError, NotFound, PolicyViolation, UnsafeValueError

__all__ = ["PendingRequest", "approve_run", "pending_request"]


@dataclass(frozen=True)
class PendingRequest:
    """What a paused run asks: the text shown (plan, digests) and the code an answer carries."""

    request_code: str
    description: str


def _run_uuid(flow_run_id: str) -> str:
    try:
        return str(uuid.UUID(flow_run_id))
    except (ValueError, TypeError, AttributeError):
        raise UnsafeValueError(f"flow run id {flow_run_id!r} is not a UUID") from None


def pending_request(api_url: str, flow_run_id: str, *, timeout: float = 15.0) -> PendingRequest:
    """Read the paused run's approval form: its request code and description.

    Raises NotFound if the run does not exist, PolicyViolation if it is not paused for an
    approval, ConnectorError if the API cannot be reached or answers something unexpected."""
    run_id = _run_uuid(flow_run_id)
    base = api_url.rstrip("/")
    try:
        run = httpx.get(f"{base}/flow_runs/{run_id}", timeout=timeout)
        if run.status_code == 404:
            raise NotFound(f"flow run {run_id} does not exist")
        run.raise_for_status()
        state = run.json().get("state") or {}
        key = (state.get("state_details") or {}).get("pause_key")
        if state.get("type") != "PAUSED" or not key:
            raise PolicyViolation(f"flow run {run_id} is not waiting for an approval")
        prefix = f"{str(state.get('name') or 'paused').lower()}-{key}"
        schema = httpx.get(f"{base}/flow_runs/{run_id}/input/{prefix}-schema", timeout=timeout)
        text = httpx.get(f"{base}/flow_runs/{run_id}/input/{prefix}-description", timeout=timeout)
        schema.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConnectorError(f"cannot read flow run {run_id} from {api_url}: {exc}") from None
    try:
        code = schema.json()["properties"]["request_code"]["default"]
    except (ValueError, KeyError, TypeError):
        raise PolicyViolation(f"flow run {run_id} is not paused for a kmp-ops approval") from None
    description = text.json() if text.status_code == 200 else ""
    return PendingRequest(str(code), description if isinstance(description, str) else "")


def approve_run(
    api_url: str,
    flow_run_id: str,
    *,
    decision: Literal["approve", "reject", "confirm"] | str,
    approver: str,
    reason: str,
    token: str,
    request_code: str | None = None,
    timeout: float = 15.0,
) -> None:
    """Resume the paused flow run ``flow_run_id`` with an approval answer.

    ``request_code`` defaults to the code the paused run shows (read first); pass the code you
    read in the UI to pin the answer to the plan you saw. Raises UnsafeValueError for a
    malformed run id or decision, NotFound if the run does not exist, PolicyViolation if the
    server refuses the resume (the run is not paused, or the answer does not fit the form),
    ConnectorError if the API cannot be reached or fails.
    Acceptance here means the run resumed; whether the answer counts is the flow's decision,
    recorded in the approvals store and the audit chain.
    """
    run_id = _run_uuid(flow_run_id)
    if decision not in ("approve", "reject", "confirm"):
        raise UnsafeValueError(
            f"decision must be 'approve', 'reject' or 'confirm', not {decision!r}"
        )
    if request_code is None:
        request_code = pending_request(api_url, run_id, timeout=timeout).request_code
    body = {
        "run_input": {
            "decision": decision,
            "approver": approver,
            "reason": reason,
            "approver_token": token,
            "request_code": request_code,
        }
    }
    url = f"{api_url.rstrip('/')}/flow_runs/{run_id}/resume"
    try:
        response = httpx.post(url, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ConnectorError(f"cannot reach the Prefect API at {api_url}: {exc}") from None
    if response.status_code == 404:
        raise NotFound(f"flow run {run_id} does not exist")
    if response.status_code >= 400:
        raise ConnectorError(
            f"the Prefect API answered {response.status_code} resuming flow run {run_id}"
        )
    try:
        result = response.json()
    except ValueError:
        raise ConnectorError("the Prefect API answered with something that is not JSON") from None
    status = str(result.get("status", "")).upper()
    if status != "ACCEPT":
        detail = (result.get("details") or {}).get("reason") or status.lower() or "refused"
        raise PolicyViolation(f"flow run {run_id} was not resumed: {detail}")


def ack_run(
    api_url: str,
    flow_run_id: str,
    *,
    responder: str,
    token: str,
    note: str = "",
    timeout: float = 15.0,
) -> None:
    """Acknowledge the page an ``incident-escalation`` run waits on, as ``responder`` with that
    person's own token (the same form as the UI's).

    Raises UnsafeValueError for a malformed run id, NotFound if the run does not exist,
    PolicyViolation if it is not waiting for an acknowledgement or the server refuses the
    resume, ConnectorError if the API cannot be reached. Acceptance means the run resumed;
    whether the acknowledgement counts (the token) is the flow's decision, audited there."""
    run_id = _run_uuid(flow_run_id)
    base = api_url.rstrip("/")
    try:
        run = httpx.get(f"{base}/flow_runs/{run_id}", timeout=timeout)
        if run.status_code == 404:
            raise NotFound(f"flow run {run_id} does not exist")
        run.raise_for_status()
        state = run.json().get("state") or {}
        key = str((state.get("state_details") or {}).get("pause_key") or "")
        if state.get("type") != "PAUSED" or not key.startswith("ack-"):
            raise PolicyViolation(f"flow run {run_id} is not waiting for an acknowledgement")
        body = {"run_input": {"responder": responder, "responder_token": token, "note": note}}
        response = httpx.post(f"{base}/flow_runs/{run_id}/resume", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ConnectorError(f"cannot reach the Prefect API at {api_url}: {exc}") from None
    if response.status_code >= 400:
        raise ConnectorError(
            f"the Prefect API answered {response.status_code} resuming flow run {run_id}"
        )
    status = str(response.json().get("status", "")).upper()
    if status != "ACCEPT":
        raise PolicyViolation(f"flow run {run_id} was not resumed: {status.lower() or 'refused'}")
