"""The approval journey in the Prefect UI: a break-glass request paused for approval, answered in a
real headless Chromium, decided by policy and recorded.

The flow (``approval-drill``) runs in a thread of the test process against the session stack's
Prefect server; the browser opens the paused run, clicks Resume, fills the form rendered from
``ApprovalForm`` and submits. The approvals store is read back from the stack's records URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.stack]

REQUESTER = "dave"


class DrillRun:
    """An ``approval-drill`` flow run started in a daemon thread, found by its unique name."""

    def __init__(self, reason: str, timeout_s: float = 180) -> None:
        from flows.approval_drill import BreakGlassRequest, approval_drill

        self.name = f"ui-drill-{uuid.uuid4().hex[:10]}"
        self.state: Any = None
        self.result: Any = None
        request = BreakGlassRequest(
            requester=REQUESTER, reason=reason, hosts=["prd-2"], duration_minutes=30
        )
        flow_fn = approval_drill.with_options(flow_run_name=self.name)

        def target() -> None:
            self.state = flow_fn(request, approval_timeout_s=timeout_s, return_state=True)
            if self.state.is_completed():
                # read here: in the test's thread Playwright's loop makes result() a coroutine
                self.result = self.state.result()

        self.thread = threading.Thread(target=target, name=self.name, daemon=True)
        self.thread.start()

    def run_id(self, timeout: float = 60) -> str:
        """The flow run's id once it exists in the API."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self.name]))
                )
                if runs:
                    return str(runs[0].id)
                time.sleep(0.2)
        raise AssertionError(f"flow run {self.name} never appeared")


def run_state(run_id: str) -> str:
    """The flow run's state type (``PAUSED``, ``COMPLETED``, …)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(uuid.UUID(run_id)).state
    return state.type.value if state else "NONE"


def wait_for_state(run_id: str, wanted: set[str], timeout: float = 60) -> float:
    """Wait until the run is in one of ``wanted``; returns the time it took."""
    t0 = time.monotonic()
    current = ""
    while time.monotonic() - t0 < timeout:
        current = run_state(run_id)
        if current in wanted:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"flow run {run_id} is {current}, expected {sorted(wanted)}")


def approvals(stack: Any, run_id: str) -> list[Any]:
    """The approval records (request and answers) of one run, oldest first."""
    from kmpops.config import load_config
    from kmpops.records import Records

    with Records(load_config(Path(stack.ops_yaml)).records.url) as rec:
        return sorted(rec.approvals(run_id=run_id), key=lambda a: a.id)


def wait_for_answer(stack: Any, run_id: str, approver: str, timeout: float = 30) -> Any:
    """The recorded answer of ``approver`` once the flow has checked it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for item in approvals(stack, run_id):
            if item.details.get("kind") == "answer" and item.approver == approver:
                return item
        time.sleep(0.2)
    raise AssertionError(f"no recorded answer from {approver} for run {run_id}")


def open_resume_dialog(page: Any, ui_url: str, run_id: str) -> Any:
    """Open the paused run in the UI and its Resume dialog; returns the dialog locator."""
    # the UI's first load compiles nothing but fetches a lot: bounded, not by the default 30 s
    page.goto(f"{ui_url.rstrip('/')}/runs/flow-run/{run_id}", timeout=120_000)
    page.get_by_role("button", name="Resume").click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    dialog.get_by_text("Break-glass access to").wait_for()
    return dialog


def answer_in_dialog(
    page: Any, dialog: Any, *, decision: str, approver: str, reason: str, token: str
) -> None:
    """Fill the approval form as a person would and submit it."""
    select = dialog.locator("button.p-select-button__control")
    select.focus()
    select.press("ArrowDown")  # opens the option list (a click toggles it twice)
    page.get_by_role("option", name=decision, exact=True).click()
    assert select.inner_text().strip() == decision

    def field(description: str) -> Any:
        return dialog.locator(".schema-form-property").filter(has_text=description)

    field("your name, as listed").locator("textarea").fill(approver)
    field("why (recorded").locator("textarea").fill(reason)
    field("your personal token").locator("textarea").fill(token)
    dialog.get_by_role("button", name="Submit").click()
    dialog.wait_for(state="hidden")


def confirm_as_requester(stack: Any, page: Any, run_id: str) -> None:
    """The requester (dave) confirms the request in the UI with his own token; returns once
    the run waits again (for its approvers)."""
    from kmpops.stack import approver_token

    dialog = open_resume_dialog(page, stack.prefect["ui_url"], run_id)
    text = dialog.inner_text()
    assert f"Waiting for the requester ({REQUESTER}) to confirm" in text
    assert "request code" in text
    answer_in_dialog(
        page,
        dialog,
        decision="confirm",
        approver=REQUESTER,
        reason="I asked for it",
        token=approver_token(Path(stack.root), REQUESTER),
    )
    assert wait_for_answer(stack, run_id, REQUESTER).outcome == "confirmed"
    wait_for_state(run_id, {"PAUSED"})
    page.reload()


def test_ui_approval_by_alice_completes_the_run(
    stack: Any, page: Any, screenshots: Path, record_property: Any
) -> None:
    from kmpops.stack import approver_token

    drill = DrillRun(reason="INC-4711: web answers 500 on prd-2, need a shell")
    run_id = drill.run_id()
    wait_for_state(run_id, {"PAUSED"})

    t0 = time.monotonic()
    confirm_as_requester(stack, page, run_id)
    dialog = open_resume_dialog(page, stack.prefect["ui_url"], run_id)
    page.wait_for_timeout(400)  # let the dialog's fade-in finish before the screenshot
    page.screenshot(path=str(screenshots / "approval-dialog.png"))
    # the plan renders as markdown: bold labels and a table, no raw markup
    text = dialog.inner_text()
    assert "Requested by:" in text and "INC-4711" in text and "**" not in text
    assert dialog.locator("table").get_by_text("prd-2").is_visible()
    assert "not dave (four-eyes)" in text and "dave (authenticated)" in text

    reason = "on call, INC-4711 confirmed in the alert"
    answer_in_dialog(
        page,
        dialog,
        decision="approve",
        approver="alice",
        reason=reason,
        token=approver_token(Path(stack.root), "alice"),
    )
    wait_for_state(run_id, {"COMPLETED"}, timeout=60)
    journey_s = time.monotonic() - t0
    record_property("ui_journey_s", round(journey_s, 2))
    print(f"UI approval journey (open run -> Completed): {journey_s:.2f}s")

    drill.thread.join(30)
    result = drill.result
    assert result["approved_by"] == ["alice"] and result["status"] == "approved"
    answer = wait_for_answer(stack, run_id, "alice")
    assert (answer.decision, answer.outcome, answer.reason) == ("approve", "approved", reason)
    request = next(a for a in approvals(stack, run_id) if a.details.get("kind") == "request")
    assert request.outcome == "approved" and request.approver == "alice"
    assert request.requested_by == REQUESTER


def test_ui_unknown_approver_is_refused_and_the_run_stays_paused(
    stack: Any, page: Any, screenshots: Path
) -> None:
    from kmpops.stack import approver_token

    drill = DrillRun(reason="INC-4712: disk full on prd-2")
    run_id = drill.run_id()
    wait_for_state(run_id, {"PAUSED"})

    dialog = open_resume_dialog(page, stack.prefect["ui_url"], run_id)
    answer_in_dialog(
        page,
        dialog,
        decision="approve",
        approver="mallory",
        reason="trust me",
        token="not-a-token",
    )
    refused = wait_for_answer(stack, run_id, "mallory")
    assert refused.outcome.startswith("refused:") and refused.decision == "approve"
    wait_for_state(run_id, {"PAUSED"})  # paused again for the time left
    time.sleep(1.5)
    assert run_state(run_id) == "PAUSED"

    # the refusal shows in the next dialog's description
    page.reload()
    dialog = open_resume_dialog(page, stack.prefect["ui_url"], run_id)
    refusal_line = dialog.get_by_text("Last answer refused: mallory")
    refusal_line.wait_for()
    refusal_line.scroll_into_view_if_needed()  # the dialog body scrolls; show the line
    page.wait_for_timeout(400)  # let the dialog's fade-in finish before the screenshot
    page.screenshot(path=str(screenshots / "approval-dialog-after-refusal.png"))
    dialog.get_by_role("button", name="Close").click()

    # the requester confirms and a real approver rejects it from the command line: the run
    # ends Failed, recorded
    kmpops = str(Path(sys.executable).with_name("kmpops"))
    for who, decision in ((REQUESTER, "confirm"), ("bob", "reject")):
        env = dict(os.environ, KMPOPS_APPROVER_TOKEN=approver_token(Path(stack.root), who))
        env["PREFECT_API_URL"] = stack.prefect["api_url"]
        answer = ["--approver", who, "--decision", decision, "--reason", "no incident ticket"]
        wait_for_state(run_id, {"PAUSED"})
        cli = subprocess.run(
            [kmpops, "approve", run_id, *answer],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert env["KMPOPS_APPROVER_TOKEN"] not in cli.stdout + cli.stderr
        wait_for_answer(stack, run_id, who)
    wait_for_state(run_id, {"FAILED"}, timeout=60)
    drill.thread.join(30)
    request, *answers = approvals(stack, run_id)
    assert request.details["kind"] == "request" and request.outcome == "rejected"
    decisions = [(a.approver, a.decision) for a in answers]
    assert decisions == [("mallory", "approve"), (REQUESTER, "confirm"), ("bob", "reject")]
    assert [a.outcome for a in answers[1:]] == ["confirmed", "rejected"]
