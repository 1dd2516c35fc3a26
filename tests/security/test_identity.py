"""Identity and binding findings of issue #9, each reproduced on the real stack (sshd fleet, S3,
PostgreSQL, the PostgreSQL-backed Prefect server): self-approval, replayed answers, change
requests used out of scope or twice, approvals without a token book, a config edited while a
deploy waited for approval, and the approver's token left in Prefect's run input.

Answers go over the REST API exactly as the UI form and ``kmpops approve`` send them
(``POST /flow_runs/{id}/resume``); what the tests look at is what a user would: the hosts'
``current`` release, the run's final state and message, the approval records, the run input the
Prefect API still serves.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

GATES5 = (
    "code_review",
    "tests_passed",
    "security_scan",
    "dependencies_updated",
    "documentation_updated",
)
VERSIONS = ("id-1.0", "id-2.0", "id-3.0", "id-4.0", "id-5.0", "id-6.0", "id-7.0", "id-8.0")


def api() -> str:
    return os.environ["PREFECT_API_URL"]


def prod_releases(stack: Any) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for h in stack.hosts:
        if h.environment != "production":
            continue
        link = Path(h.root) / "srv/web/current"
        out[h.name] = os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None
    return out


def token(stack: Any, who: str) -> str:
    path = Path(stack.root) / "secrets" / f"approver-{who}.token"
    return path.read_text().strip() if path.exists() else "not-a-token"


def production_only(data: dict[str, Any], **policy: Any) -> None:
    """No staging (faster), production without bake; ``policy`` overrides."""
    data["environments"].pop("staging", None)
    data["environments"]["production"]["policy"].update({"bake_time": "0s", **policy})
    data["services"]["web"].pop("analysis", None)  # about approvals: health checks alone


@pytest.fixture(scope="module")
def variant(stack: Any, tmp_path_factory: pytest.TempPathFactory):
    """``variant(mutate)`` writes a copy of the stack's ops.yaml changed by ``mutate`` and points
    KMPOPS_CONFIG at it (restored at the end of the module); returns its path."""
    folder = tmp_path_factory.mktemp("identity-config")
    old = os.environ["KMPOPS_CONFIG"]
    count = [0]

    def apply(mutate: Callable[[dict[str, Any]], None]) -> Path:
        data = yaml.safe_load(Path(stack.ops_yaml).read_text())
        mutate(data)
        count[0] += 1
        path = folder / f"ops-{count[0]}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        os.environ["KMPOPS_CONFIG"] = str(path)
        return path

    yield apply
    os.environ["KMPOPS_CONFIG"] = old


@pytest.fixture(scope="module")
def baseline(stack: Any, variant: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory):
    """Publish the id-* releases with their evidence; put id-1.0 on every production host."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    out = tmp_path_factory.mktemp("identity-releases")
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    for version in VERSIONS:
        tarball = build_release(version, out, variant="good")
        put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())
    variant(lambda d: production_only(d, approval_required=False))
    deploy_pipeline(
        DeployRequest(
            service="web",
            version="id-1.0",
            environment="production",
            allow_first_install=True,
            bake_seconds=0,
            requested_by="dave",
        )
    )
    assert set(prod_releases(stack).values()) == {"id-1.0"}


def start(flow: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``flow(*args, return_state=True, **kwargs)`` in a thread; the box gets its state."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["state"] = flow(*args, return_state=True, **kwargs)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, box


def pending_run(subject_prefix: str, timeout: float = 90) -> str:
    """The run id of the newest pending approval request whose subject starts so."""
    from tasks.common import records

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [
            a
            for a in records().approvals()
            if a.outcome == "pending"
            and (a.details or {}).get("kind") == "request"
            and a.subject.startswith(subject_prefix)
        ]
        if rows:
            return str(rows[-1].run_id)
        time.sleep(0.2)
    raise AssertionError(f"no pending approval for {subject_prefix!r}")


class Answerer:
    """Sends answers to one paused run the way the UI form does, one per pause."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.used_states: set[str] = set()
        self.sent: list[dict[str, Any]] = []

    def _paused_state(self, timeout: float = 60) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = httpx.get(f"{api()}/flow_runs/{self.run_id}", timeout=10).json()["state"]
            if state["type"] == "PAUSED" and state["id"] not in self.used_states:
                return state
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return None
            time.sleep(0.1)
        return None

    def code(self, state: dict[str, Any]) -> str:
        """The request code the form offers (empty if the form has none)."""
        key = f"{state['name'].lower()}-{state['state_details']['pause_key']}-schema"
        schema = httpx.get(f"{api()}/flow_runs/{self.run_id}/input/{key}", timeout=10).json()
        return str(schema.get("properties", {}).get("request_code", {}).get("default", ""))

    def send(self, body: dict[str, Any], *, with_code: bool = True) -> str:
        """Resume with ``body`` (the form's request code added unless ``with_code`` is False
        or the body has one); returns the server's status, '' if the run no longer waits."""
        state = self._paused_state()
        if state is None:
            return ""
        body = dict(body)
        code = self.code(state)
        if with_code and code and "request_code" not in body:
            body["request_code"] = code
        response = httpx.post(
            f"{api()}/flow_runs/{self.run_id}/resume", json={"run_input": body}, timeout=10
        )
        status = str(response.json().get("status", "")).upper()
        if status == "ACCEPT":
            self.used_states.add(state["id"])
        self.sent.append(body)
        return status


def answer(stack: Any, who: str, decision: str, *, as_name: str | None = None) -> dict[str, Any]:
    return {
        "decision": decision,
        "approver": as_name or who,
        "reason": "identity test",
        "approver_token": token(stack, who),
    }


def answers_for(run_id: str) -> list[tuple[str, str]]:
    from tasks.common import records

    return [
        (str(a.approver), a.outcome)
        for a in records().approvals(run_id=run_id)
        if (a.details or {}).get("kind") == "answer"
    ]


def finish(thread: threading.Thread, box: dict[str, Any]) -> Any:
    thread.join(180)
    assert not thread.is_alive(), "the flow did not finish"
    assert "error" not in box, box.get("error")
    return box["state"]


# -- four-eyes ---------------------------------------------------------------------------------


def test_self_approval_with_empty_requested_by_refused(stack, baseline, variant) -> None:
    """alice starts a deploy leaving requested_by empty and approves it herself."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    variant(lambda d: production_only(d, approval_timeout="60s"))
    before = prod_releases(stack)
    thread, box = start(
        deploy_pipeline,
        DeployRequest(service="web", version="id-2.0", bake_seconds=0, requested_by=""),
    )
    run = pending_run("deploy web@id-2.0")
    answers = Answerer(run)
    answers.send(answer(stack, "alice", "approve"))  # before anyone confirmed the request
    answers.send(answer(stack, "alice", "confirm"))  # she files it as herself...
    answers.send(answer(stack, "alice", "approve"))  # ...and approves it: four-eyes
    answers.send(answer(stack, "bob", "reject"))
    state = finish(thread, box)
    assert prod_releases(stack) == before
    assert state.is_failed()
    assert ("alice", "refused:self_approval") in answers_for(run)
    assert ("alice", "refused:requester_unconfirmed") in answers_for(run)


def test_self_approval_with_forged_requested_by_refused(stack, baseline, variant) -> None:
    """alice files the deploy as dave (free text) and approves it with her own token."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    variant(lambda d: production_only(d, approval_timeout="12s"))
    before = prod_releases(stack)
    thread, box = start(
        deploy_pipeline,
        DeployRequest(service="web", version="id-3.0", bake_seconds=0, requested_by="dave"),
    )
    run = pending_run("deploy web@id-3.0")
    answers = Answerer(run)
    answers.send(answer(stack, "alice", "approve"))
    answers.send(answer(stack, "alice", "confirm", as_name="dave"))  # dave's name, her token
    answers.send(answer(stack, "alice", "confirm"))  # her own name: not the requester
    state = finish(thread, box)  # nobody authenticated the request: it times out, rejected
    assert prod_releases(stack) == before
    assert state.is_failed()
    got = answers_for(run)
    assert ("alice", "refused:requester_unconfirmed") in got
    assert ("dave", "refused:bad_token") in got
    assert ("alice", "refused:not_requester") in got
    assert not [o for _, o in got if o == "approved"]


# -- binding -----------------------------------------------------------------------------------


def test_approval_replayed_on_second_run_refused_and_token_not_left_in_run_input(
    stack, baseline, variant
) -> None:
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from tasks.common import records

    variant(lambda d: production_only(d, approval_timeout="15s"))
    thread, box = start(
        deploy_pipeline,
        DeployRequest(service="web", version="id-4.0", bake_seconds=0, requested_by="dave"),
    )
    run_a = pending_run("deploy web@id-4.0")
    first = Answerer(run_a)
    first.send(answer(stack, "dave", "confirm"))
    assert first.send(answer(stack, "bob", "approve")) == "ACCEPT"
    bobs_answer = first.sent[-1]
    state = finish(thread, box)
    assert state.is_completed(), state.message
    assert set(prod_releases(stack).values()) == {"id-4.0"}

    # what Prefect still serves of run A's input holds no token
    stored = httpx.post(
        f"{api()}/flow_runs/{run_a}/input/filter",
        json={"prefix": "paused-", "limit": 100, "exclude_keys": []},
        timeout=10,
    ).json()
    assert stored, "the run's form schema/description should still be there"
    assert not [i for i in stored if token(stack, "bob") in i["value"]]
    assert not [i for i in stored if i["key"].endswith("-response")]

    # the approval record keeps what was approved
    request = next(
        a for a in records().approvals(run_id=run_a) if (a.details or {}).get("kind") == "request"
    )
    plan = request.details["plan"]
    assert (plan["service"], plan["version"], plan["environment"]) == (
        "web",
        "id-4.0",
        "production",
    )
    assert sorted(plan["hosts"]) == sorted(prod_releases(stack))
    assert plan["artifact_source"].endswith("releases/web/id-4.0.tar.gz")
    assert len(plan["artifact_sha256"]) == 64 and len(plan["config_digest"]) == 64
    assert len(request.details["plan_digest"]) == 64
    assert (request.outcome, request.requested_by) == ("approved", "dave")

    # bob's answer, replayed word for word on a second run, does not count
    thread, box = start(
        deploy_pipeline,
        DeployRequest(service="web", version="id-5.0", bake_seconds=0, requested_by="dave"),
    )
    run_b = pending_run("deploy web@id-5.0")
    second = Answerer(run_b)
    second.send(answer(stack, "dave", "confirm"))
    second.send(bobs_answer)
    state = finish(thread, box)
    assert state.is_failed()
    assert set(prod_releases(stack).values()) == {"id-4.0"}
    assert ("bob", "refused:wrong_request") in answers_for(run_b)


def test_config_edited_between_approval_and_production_refused(stack, baseline, variant) -> None:
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    path = variant(lambda d: production_only(d, approval_timeout="60s"))
    before = prod_releases(stack)
    thread, box = start(
        deploy_pipeline,
        DeployRequest(service="web", version="id-6.0", bake_seconds=0, requested_by="dave"),
    )
    run = pending_run("deploy web@id-6.0")
    answers = Answerer(run)
    answers.send(answer(stack, "dave", "confirm"))
    # while the run waits for its approver, someone changes how production is rolled out
    data = yaml.safe_load(path.read_text())
    data["environments"]["production"]["policy"]["batch_size"] = "100%"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    answers.send(answer(stack, "bob", "approve"))
    state = finish(thread, box)
    assert state.is_failed()
    assert "config changed since the plan was approved" in str(state.message)
    assert prod_releases(stack) == before


# -- change requests -------------------------------------------------------------------------


def _live_change_request(services: list[str], version: str) -> int:
    """A change request as the records would hold one mid-implementation."""
    from tasks.common import records

    return (
        records()
        .add_change_request(
            title="live change",
            services=services,
            environments=["production"],
            requested_by="dave",
            state="implementing",
            risk="high",
            details={"version": version, "approved_by": ["alice", "bob"]},
        )
        .id
    )


def test_change_request_for_another_service_or_run_refused(stack, baseline, variant) -> None:
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from tasks.common import records

    variant(lambda d: production_only(d))
    before = prod_releases(stack)
    for services in (["api"], ["web"]):  # another service; this service but not its own run
        cr_id = _live_change_request(services, "id-7.0")
        state = deploy_pipeline(
            DeployRequest(
                service="web",
                version="id-7.0",
                bake_seconds=0,
                change_request_id=cr_id,
                requested_by="dave",
            ),
            return_state=True,
        )
        assert state.is_failed()
        assert f"change request #{cr_id}" in str(state.message)
        assert prod_releases(stack) == before
        assert not [a for a in records().approvals() if a.subject.startswith("deploy web@id-7")]


def test_change_request_is_consumed_once(stack, baseline, variant) -> None:
    """A change request naming web twice: the first deploy spends it, the second is refused
    and the change ends rolled back (web is back on its previous release)."""
    from flows.change_request import ChangeRequestInput, change_request
    from tasks.common import records

    variant(lambda d: production_only(d, approval_timeout="60s"))
    before = prod_releases(stack)
    thread, box = start(
        change_request,
        ChangeRequestInput(
            title="web twice",
            services=["web", "web"],
            environments=["production"],
            version="id-8.0",
            requested_by="dave",
        ),
    )
    run = pending_run("change-request/")
    answers = Answerer(run)
    answers.send(answer(stack, "dave", "confirm"))
    answers.send(answer(stack, "alice", "approve"))
    answers.send(answer(stack, "bob", "approve"))
    state = finish(thread, box)
    assert state.is_failed()
    assert "already used for web in production" in str(state.message)
    assert prod_releases(stack) == before
    rows = [r for r in records().change_requests() if r.title == "web twice"]
    assert rows and (rows[-1].state, rows[-1].outcome) == ("rolled_back", "rolled_back")
    spent = records().consumptions(prefix=f"change-request:{rows[-1].id}:")
    assert [c.key for c in spent] == [f"change-request:{rows[-1].id}:web:production"]


# -- token book ------------------------------------------------------------------------------


def test_approval_required_without_token_book_refused_at_validation(stack, tmp_path) -> None:
    from typer.testing import CliRunner

    from kmpops.cli import app
    from kmpops.config import load_config
    from kmpops.errors import ConfigError

    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["environments"]["production"]["policy"].pop("approver_tokens")
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "environments.production.policy: approval_required needs approver_tokens" in str(
        err.value.problems
    )
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "approval_required needs approver_tokens" in result.output


def test_service_identity_cannot_be_claimed_by_a_parameter(stack, baseline, variant) -> None:
    """``service:scheduler`` comes from the run's provenance (Prefect's scheduler), never from
    a form: a person typing it to skip the requester's confirmation is refused."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    variant(lambda d: production_only(d))
    before = prod_releases(stack)
    state = deploy_pipeline(
        DeployRequest(
            service="web", version="id-7.0", bake_seconds=0, requested_by="service:scheduler"
        ),
        return_state=True,
    )
    assert state.is_failed()
    assert "service identities come from the run, not a parameter" in str(state.message)
    assert prod_releases(stack) == before


def test_emergency_override_of_a_staging_freeze_is_approved_by_another_person(
    stack, baseline, variant
) -> None:
    """Declaring an emergency is a human act: overriding staging's freeze window (staging needs
    no approval otherwise) waits for the requester's confirmation and one other approver."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from tasks.common import records

    def frozen_staging(data: dict[str, Any]) -> None:
        data["environments"]["staging"]["policy"]["freeze_windows"] = [
            {"name": "now", "start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}
        ]

    variant(frozen_staging)
    thread, box = start(
        deploy_pipeline,
        DeployRequest(
            service="web",
            version="id-2.0",
            environment="staging",
            emergency=True,
            allow_first_install=True,
            bake_seconds=0,
            requested_by="alice",
        ),
    )
    run = pending_run("deploy web@id-2.0->staging")
    answers = Answerer(run)
    answers.send(answer(stack, "alice", "confirm"))
    answers.send(answer(stack, "alice", "approve"))  # her own emergency: four-eyes
    answers.send(answer(stack, "carol", "approve"))
    state = finish(thread, box)
    assert state.is_completed(), state.message
    staging = [h for h in stack.hosts if h.environment == "staging"]
    assert {os.readlink(Path(h.root) / "srv/web/current").rsplit("/", 1)[-1] for h in staging} == {
        "id-2.0"
    }
    got = answers_for(run)
    assert ("alice", "confirmed") in got and ("carol", "approved") in got
    assert ("alice", "refused:self_approval") in got
    request = next(
        a for a in records().approvals(run_id=run) if (a.details or {}).get("kind") == "request"
    )
    assert (request.requested_by, request.approver) == ("alice", "carol")
