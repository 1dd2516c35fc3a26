"""Answer a paused approval from outside the run (`kmpops approve RUN_ID`) over the REST API.

No Prefect import: a plain ``POST /flow_runs/{id}/resume`` with the same input the UI form sends
(``decision``, ``approver``, ``reason``, ``approver_token``). The server validates the input
against the form's schema; the paused flow then checks the answer against policy (allowed
approver, four-eyes, quorum, token) and records it. The token travels only in the request body;
it is never logged or echoed in an error.
"""

from __future__ import annotations

import uuid
from typing import Literal

import httpx

from kmpops.errors import ConnectorError, NotFound, PolicyViolation, UnsafeValueError

__all__ = ["approve_run"]


def approve_run(
    api_url: str,
    flow_run_id: str,
    *,
    decision: Literal["approve", "reject"] | str,
    approver: str,
    reason: str,
    token: str,
    timeout: float = 15.0,
) -> None:
    """Resume the paused flow run ``flow_run_id`` with an approval answer.

    Raises UnsafeValueError for a malformed run id or decision, NotFound if the run does not
    exist, PolicyViolation if the server refuses the resume (the run is not paused, or the
    answer does not fit the form), ConnectorError if the API cannot be reached or fails.
    Acceptance here means the run resumed; whether the answer counts is the flow's decision,
    recorded in the approvals store and the audit chain.
    """
    try:
        run_id = str(uuid.UUID(flow_run_id))
    except (ValueError, TypeError, AttributeError):
        raise UnsafeValueError(f"flow run id {flow_run_id!r} is not a UUID") from None
    if decision not in ("approve", "reject"):
        raise UnsafeValueError(f"decision must be 'approve' or 'reject', not {decision!r}")
    body = {
        "run_input": {
            "decision": decision,
            "approver": approver,
            "reason": reason,
            "approver_token": token,
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
