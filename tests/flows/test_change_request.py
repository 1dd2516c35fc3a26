"""change-request end to end: impact and risk, risk-based quorum, deploy-pipeline as a subflow,
rollback on failure, closed with its outcome — on the real stack."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


def snapshot(stack) -> dict[str, str | None]:
    out = {}
    for h in stack.hosts:
        link = Path(h.root) / "srv/web/current"
        out[h.name] = os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None
    return out


@pytest.fixture(scope="module")
def baseline(stack, tmp_path_factory):
    """Publish cr-* releases with evidence; put cr-1.0 on every host (no approval, no bake)."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    out = tmp_path_factory.mktemp("cr-releases")
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    for version, variant in {"cr-1.0": "good", "cr-2.0": "good", "cr-3.0": "unhealthy"}.items():
        tarball = build_release(version, out, variant=variant)
        put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["environments"]["production"]["policy"]["approval_required"] = False
    data["services"]["web"].pop("analysis")  # no users on production here: nothing to judge
    variant = out / "ops.yaml"
    variant.write_text(yaml.safe_dump(data))
    old = os.environ["KMPOPS_CONFIG"]
    os.environ["KMPOPS_CONFIG"] = str(variant)
    try:
        deploy_pipeline(
            DeployRequest(
                service="web",
                version="cr-1.0",
                allow_first_install=True,
                bake_seconds=0,
                requested_by="dave",
            )
        )
    finally:
        os.environ["KMPOPS_CONFIG"] = old
    assert set(snapshot(stack).values()) == {"cr-1.0"}


@pytest.fixture(autouse=True)
def _health_checks_only(stack, tmp_path, monkeypatch):
    """These tests are about change requests: deploys go on health checks alone (production
    has no users here for an analysis to judge; tests/flows/test_deploy_pipeline.py has those)."""
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["services"]["web"].pop("analysis")
    path = tmp_path / "ops-health-checks-only.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(path))


def answer(stack, answers, subject_prefix="change-request/", requester="dave"):
    """Answer the next paused approval(s) from a thread as ``kmpops approve`` does: first the
    requester confirms the change with their own token, then each (approver, decision)."""
    from prefect.client.orchestration import get_client

    from kmpops.approve import approve_run
    from kmpops.stack import approver_token
    from tasks.common import records

    errors: list[BaseException] = []

    def work():
        try:
            deadline = time.monotonic() + 60
            run_id = None
            while run_id is None and time.monotonic() < deadline:
                pending = [
                    a
                    for a in records().approvals()
                    if a.outcome == "pending" and a.subject.startswith(subject_prefix)
                ]
                run_id = pending[-1].run_id if pending else None
                time.sleep(0.2)
            seen = set()
            with get_client(sync_client=True) as client:
                for who, decision in [(requester, "confirm"), *answers]:
                    while True:
                        state = client.read_flow_run(run_id).state
                        if state.is_paused() and state.id not in seen:
                            seen.add(state.id)
                            break
                        time.sleep(0.1)
                    approve_run(
                        os.environ["PREFECT_API_URL"],
                        run_id,
                        decision=decision,
                        approver=who,
                        reason="reviewed",
                        token=approver_token(Path(stack.root), who),
                    )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def run_change(**kwargs):
    from flows.change_request import ChangeRequestInput, change_request

    kwargs.setdefault("title", "upgrade web")
    kwargs.setdefault("services", ["web"])
    kwargs.setdefault("environments", ["staging", "production"])
    kwargs.setdefault("requested_by", "dave")
    return change_request(ChangeRequestInput(**kwargs), return_state=True)


def test_high_risk_change_needs_two_approvers_and_is_implemented(stack, baseline):
    from tasks.common import records

    thread = answer(stack, [("alice", "approve"), ("bob", "approve")])
    state = run_change(version="cr-2.0")
    thread.join(10)
    assert not thread.errors
    assert state.is_completed(), state.message
    result = state.result()
    assert result["outcome"] == "implemented"
    assert set(snapshot(stack).values()) == {"cr-2.0"}
    cr = records().change_request(result["id"])
    assert (cr.risk, cr.state, cr.outcome) == ("high", "implemented", "implemented")
    assert sorted(cr.details["approved_by"]) == ["alice", "bob"]
    assert (cr.requested_by, cr.details["requester"]) == ("dave", "dave")  # authenticated
    spent = records().consumptions(prefix=f"change-request:{cr.id}:")
    assert [c.key for c in spent] == [f"change-request:{cr.id}:web:production"]
    actions = [e.action for e in records().audit_events(subject=f"change-request/{cr.id}")]
    for action in (
        "change.requested",
        "change.assessed",
        "approval.outcome",
        "change.approved",
        "change.closed",
    ):
        assert action in actions
    # deploy-pipeline accepted the change request's approvals instead of asking again
    assert not [a for a in records().approvals() if a.subject.startswith("deploy web@cr-2.0")]


def test_rejected_change_changes_nothing(stack, baseline):
    from tasks.common import records

    before = snapshot(stack)
    thread = answer(stack, [("carol", "reject")])
    state = run_change(version="cr-3.0")
    thread.join(10)
    assert state.is_completed()
    result = state.result()
    assert result["outcome"] == "rejected"
    assert records().change_request(result["id"]).state == "closed"
    assert snapshot(stack) == before


def test_failed_implementation_is_rolled_back_and_closed(stack, baseline):
    from tasks.common import records

    before = snapshot(stack)
    thread = answer(stack, [("alice", "approve")])
    state = run_change(version="cr-3.0", environments=["staging"])  # medium: one approver
    thread.join(10)
    assert state.is_failed()
    assert "rolled back" in state.message
    assert snapshot(stack) == before
    rows = [r for r in records().approvals() if r.subject.startswith("change-request/")]
    last = max((r for r in rows if (r.details or {}).get("kind") == "request"), key=lambda r: r.id)
    cr_id = int(last.subject.split("/")[1])
    cr = records().change_request(cr_id)
    assert (cr.risk, cr.state, cr.outcome) == ("medium", "rolled_back", "rolled_back")


def test_unknown_environment_refused_before_anything(stack, baseline):
    from tasks.common import records

    count = len(records().audit_events(action="change.requested"))
    state = run_change(version="cr-2.0", environments=["nope"])
    assert state.is_failed() and "unknown environment" in state.message
    assert len(records().audit_events(action="change.requested")) == count


def test_change_whose_run_crashed_is_closed_from_the_records(stack, baseline):
    """A change-request run that died mid-implementation leaves its change ``implementing``;
    change-request-recover closes it from the records: ``implemented`` when its deploy
    completed, ``rolled_back`` when nothing of it went live, and leaves a live run alone."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from flows.change_request import change_request_recover, close_after_deploy_recovery
    from kmpops.errors import PolicyViolation
    from tasks.common import records

    @flow(name="change-request")
    def stand_in() -> None:  # only its flow run row is used: the run that "died"
        return None

    def dead_run(state) -> str:
        with get_client(sync_client=True) as client:
            run = client.create_flow_run(stand_in, state=Running())
            client.set_flow_run_state(run.id, state, force=True)
        return str(run.id)

    rec = records()

    def change(owner: str) -> int:
        return rec.add_change_request(
            title="crashed change",
            services=["web"],
            environments=["production"],
            requested_by="dave",
            state="implementing",
            details={"version": "cr-2.0", "run_id": owner, "approved_by": ["alice", "bob"]},
        ).id

    # deployed before the crash: its deploy run's audit trail says completed
    done_owner = dead_run(Crashed(message="process killed"))
    done_id = change(done_owner)
    deploy_run = dead_run(Crashed(message="stand-in deploy run"))
    for action, details in (
        ("deploy.requested", {"change_request_id": done_id, "dry_run": False}),
        ("deploy.activating", {"batch": 1}),
        ("deploy.completed", {}),
    ):
        rec.audit(
            actor="pytest",
            action=action,
            subject="web@cr-2.0->production",
            details=details,
            run_id=deploy_run,
        )
    # crashed before any deploy
    empty_id = change(dead_run(Crashed(message="process killed")))
    # still running: left alone, refused when asked for by id
    live_id = change(dead_run(Running()))
    # crashed half-way through its deploy: left open until deploy-recover put the hosts back
    half_id = change(dead_run(Crashed(message="process killed")))
    half_deploy = dead_run(Crashed(message="stand-in deploy run, killed mid-rollout"))
    for action, details in (
        ("deploy.requested", {"change_request_id": half_id, "dry_run": False}),
        ("deploy.activating", {"batch": 1}),
    ):
        rec.audit(
            actor="pytest",
            action=action,
            subject="web@cr-2.0->production",
            details=details,
            run_id=half_deploy,
        )

    closed = {c["id"]: c["state"] for c in change_request_recover()}
    assert closed[done_id] == "implemented" and closed[empty_id] == "rolled_back"
    assert live_id not in closed and half_id not in closed
    assert rec.change_request(half_id).state == "implementing"
    # what deploy-recover records once the hosts are back, then the close it asks for
    rec.audit(
        actor="pytest",
        action="deploy.recovered",
        subject=f"flow-run/{half_deploy}",
        details={"hosts": ["prd-1: cr-2.0 -> 1.0"]},
        run_id=half_deploy,
    )
    (after,) = close_after_deploy_recovery([half_id])
    assert (after["id"], after["state"]) == (half_id, "rolled_back")
    assert rec.change_request(half_id).state == "rolled_back"
    assert rec.change_request(done_id).state == "implemented"
    assert rec.change_request(empty_id).state == "rolled_back"
    assert rec.change_request(live_id).state == "implementing"
    state = change_request_recover(change_request_id=live_id, return_state=True)
    assert state.is_failed() and "force=True" in state.message
    with pytest.raises(PolicyViolation):
        state.result()
    assert change_request_recover(change_request_id=done_id) == []  # idempotent
