"""deploy-pipeline end to end on the real stack: sshd hosts, SeaweedFS, PostgreSQL-backed Prefect.

Releases are the sample service's tarballs, stored in S3 with the checklist's evidence records.
Approvals are answered from a thread while the flow waits (``resume_flow_run``, and once through
``kmpops.approve.approve_run`` like the CLI). Host state is read from the hosts' directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.flows.traffic import user_traffic

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

# -- helpers -------------------------------------------------------------------------------


def current_of(host_root: str) -> str | None:
    link = Path(host_root) / "srv" / "web" / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def snapshot(stack) -> dict[str, str | None]:
    return {h.name: current_of(h.root) for h in stack.hosts}


def write_variant(stack, tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    mutate(data)
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def use_config(monkeypatch, stack, tmp_path):
    """Run with a variant of the stack's ops.yaml: ``use_config(mutate)``."""

    def apply(mutate) -> Path:
        path = write_variant(stack, tmp_path, mutate)
        monkeypatch.setenv("KMPOPS_CONFIG", str(path))
        return path

    yield apply


def no_staging(data) -> None:
    data["environments"].pop("staging")


def quick(data, *, keep_analysis: bool = False, **policy) -> None:
    """Production policy changes; the service's analysis is dropped unless ``keep_analysis``
    (tests of other things deploy on health checks alone, with no traffic to judge)."""
    data["environments"]["production"]["policy"].update(policy)
    if not keep_analysis:
        no_analysis(data)


def no_analysis(data) -> None:
    data["services"]["web"].pop("analysis", None)


def staging_traffic_only_generates(data) -> None:
    """The service's staging tests send traffic but accept any answer: whatever fails, the
    analysis of the real service has to see it."""
    data["services"]["web"]["staging_tests"]["traffic"]["expect_status"] = [200, 500]


def flag_gated_health(data, *, retries: int) -> None:
    """The web health check also fails on a host whose ``<root>/missing-dependency-of`` names
    the release being checked (how a test makes chosen hosts fail a chosen release)."""
    data["services"]["web"]["health_check"] = {
        "command": "{deploy_path}/current/control health --port {web_port}"
        ' && test "$(cat {root}/missing-dependency-of 2>/dev/null)"'
        ' != "$(cat {deploy_path}/current/VERSION)"',
        "retries": retries,
        "interval": 0.2,
    }


def when_switched(host_root: str, version: str, action) -> threading.Thread:
    """Start a thread that runs ``action()`` as soon as the host's ``current`` is ``version``
    (it gives up after 60 s); join it after the run."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if current_of(host_root) == version:
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def releases(stack, tmp_path_factory):
    """Publish sample releases (tarball + CI's evidence) to the stack's S3 bucket."""
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    out = tmp_path_factory.mktemp("releases")
    cfg = load_config(stack.ops_yaml)
    store = open_store(cfg.storage, resolve_secret)
    specs = {
        "1.0.0": "good",
        "2.0.0": "good",
        "2.1.0": "good",
        "3.0.0": "unhealthy",
        "4.0.0": "errors",
        "5.0.0": "good",
        "6.0.0": "good",
        "7.0.0": "good",
        "8.0.0": "good",
        "9.0.0": "good",
        "9.1.0": "good",
        "10.0.0": "good",
        "11.0.0": "good",
        "12.0.0": "good",
    }
    for version, variant in specs.items():
        tarball = build_release(
            version, out, variant=variant, parameter=0.5 if variant == "errors" else None
        )
        put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())
    return specs


@pytest.fixture(scope="module")
def baseline(stack, releases):
    """1.0.0 on every host: a first install through the pipeline (no approval, no bake)."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    folder = Path(stack.root) / "test-variants"
    folder.mkdir(exist_ok=True)
    path = write_variant(stack, folder, lambda d: quick(d, approval_required=False))
    old = os.environ["KMPOPS_CONFIG"]
    os.environ["KMPOPS_CONFIG"] = str(path)
    try:
        result = deploy_pipeline(
            DeployRequest(
                service="web",
                version="1.0.0",
                allow_first_install=True,
                bake_seconds=0,
                requested_by="dave",
            )
        )
    finally:
        os.environ["KMPOPS_CONFIG"] = old
    assert result["status"] == "deployed"
    assert set(snapshot(stack).values()) == {"1.0.0"}
    return result


def answer_when_paused(
    answers, *, subject_prefix="deploy ", via_cli=False, requester="dave", requester_token=None
):
    """Start a thread that answers the next paused approval(s) in order, after the requester
    confirmed the request with their own token (``requester=None``: no confirmation);
    returns the thread."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from tasks.common import records

    errors: list[BaseException] = []
    # a request left pending by an earlier run (one that crashed while paused) is not ours
    stale = {a.id for a in records().approvals() if a.outcome == "pending"}

    def find_run() -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pending = [
                a
                for a in records().approvals()
                if a.outcome == "pending"
                and a.subject.startswith(subject_prefix)
                and a.id not in stale
            ]
            if pending:
                return pending[-1].run_id
            time.sleep(0.2)
        raise TimeoutError("no pending approval")

    def wait_paused(run_id: str, seen: set) -> None:
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(run_id).state
                if state.is_paused() and state.id not in seen:
                    seen.add(state.id)
                    return
                time.sleep(0.1)
        raise TimeoutError("run did not pause")

    def work() -> None:
        try:
            run_id = find_run()
            seen: set = set()
            first = [approve(requester, decision="confirm", token=requester_token)]
            for ans in (first if requester else []) + list(answers):
                ans = dict(ans)
                if ans["approver_token"] is None:
                    from kmpops.stack import approver_token

                    known = ans["approver"] in (*APPROVERS, "dave", "erin")
                    ans["approver_token"] = (
                        approver_token(STACK_ROOT[0], ans["approver"]) if known else "x"
                    )
                wait_paused(run_id, seen)
                if via_cli:
                    from kmpops.approve import approve_run

                    approve_run(
                        os.environ["PREFECT_API_URL"],
                        run_id,
                        decision=ans["decision"],
                        approver=ans["approver"],
                        reason=ans.get("reason", ""),
                        token=ans.get("approver_token", ""),
                    )
                else:
                    from kmpops.approve import pending_request

                    code = pending_request(os.environ["PREFECT_API_URL"], run_id).request_code
                    resume_flow_run(run_id, run_input={**ans, "request_code": code})
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


STACK_ROOT: list[Path] = []


def approve(approver, reason="looks good", decision="approve", token=None):
    """An answer; the approver's real token from the local stack (filled in when it is sent)
    unless ``token`` is given."""
    return {"decision": decision, "approver": approver, "reason": reason, "approver_token": token}


APPROVERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module", autouse=True)
def _stack_root(stack):
    STACK_ROOT[:] = [Path(stack.root)]


def run_deploy(**kwargs):
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    kwargs.setdefault("service", "web")
    kwargs.setdefault("requested_by", "dave")
    return deploy_pipeline(DeployRequest(**kwargs), return_state=True)


def failure_text(state) -> str:
    exc = state.result(raise_on_failure=False)
    return f"{state.message} {exc}"


# -- tests ---------------------------------------------------------------------------------


def test_happy_path_staging_then_production_with_approval(stack, baseline, use_config):
    from tasks.common import records

    use_config(lambda d: None)
    before = snapshot(stack)
    answering = answer_when_paused([approve("alice")], via_cli=True)
    with user_traffic(stack):
        state = run_deploy(version="2.0.0", bake_seconds=1)
    answering.join(10)
    assert not answering.errors
    assert state.is_completed(), failure_text(state)
    result = state.result()
    assert set(snapshot(stack).values()) == {"2.0.0"}
    assert result["previous"] == before
    rec = records()
    for host in stack.hosts:
        row = rec.current_release("web", host.environment, host.name)
        assert row.version == "2.0.0"
        assert rec.previous_release("web", host.environment, host.name).version == "1.0.0"
    answers = [a for a in rec.approvals() if a.outcome == "approved"]
    assert answers and answers[-1].approver == "alice"
    actions = [e.action for e in rec.audit_events(run_id=str(state.state_details.flow_run_id))]
    for action in (
        "deploy.requested",
        "deploy.checklist",
        "deploy.switch",
        "deploy.staging_tests",
        "deploy.analysis",
        "approval.answer",
        "deploy.completed",
    ):
        assert action in actions
    analyses = [
        e.details
        for e in rec.audit_events(
            action="deploy.analysis", run_id=str(state.state_details.flow_run_id)
        )
    ]
    # staging, then each production batch's bake, judged on Prometheus
    assert [(a["label"], a["outcome"], a["source"]) for a in analyses] == [
        ("staging", "passed", "prometheus"),
        ("production batch 1/2", "passed", "prometheus"),
        ("production batch 2/2", "passed", "prometheus"),
    ]
    assert rec.verify_audit().ok
    # the production change is anchored: a checkpoint that saw deploy.completed
    completed = rec.audit_events(action="deploy.completed")[-1]
    anchored, unreadable = rec.audit_checkpoints()
    assert unreadable == []
    assert any(
        c.reason == "deploy-pipeline web@2.0.0->production" and c.seq >= completed.seq
        for c in anchored
    )


def test_bad_release_in_second_batch_rolls_back_first_batch(stack, baseline, use_config):
    """Batch 2 hosts lack what the release needs (a flag file makes their health check fail)."""
    from tasks.common import records

    def mutate(d):
        no_staging(d)
        quick(d, approval_required=False)
        flag_gated_health(d, retries=3)

    use_config(mutate)
    before = snapshot(stack)
    prod = [h for h in stack.hosts if h.environment == "production"]
    flags = [Path(h.root) / "missing-dependency-of" for h in prod[2:]]
    for flag in flags:
        flag.write_text("2.1.0\n")
    try:
        state = run_deploy(version="2.1.0", bake_seconds=0)
    finally:
        for flag in flags:
            flag.unlink()
    assert state.is_failed()
    text = failure_text(state)
    assert "batch 2/2" in text and "rolled back" in text
    # both hosts failed for one reason: said once, with both names (issue 8: 50 hosts, 1 line)
    assert "2 hosts: " in text and ": prd-3, prd-4" in text
    assert state.message.count("health check") == 1
    from tests.flows.backup_fixtures import latest_artifact

    table = latest_artifact("deploy-host-failures")  # ... and each host's own words are kept
    assert table["flow_run_id"] == str(state.state_details.flow_run_id)
    rows = json.loads(table["data"])
    assert [r["host"] for r in rows] == ["prd-3", "prd-4"]
    assert all(r["error"].startswith(f"HostDeployFailed: {r['host']}: health") for r in rows)
    assert snapshot(stack) == before
    actions = [
        e.action for e in records().audit_events(run_id=str(state.state_details.flow_run_id))
    ]
    assert actions.count("deploy.rollback") == 4  # two of batch 1, two switched in batch 2
    assert "deploy.rolled_back" in actions
    # the rolled-back production change is anchored too
    rolled_back = records().audit_events(action="deploy.rolled_back")[-1]
    anchored, _ = records().audit_checkpoints()
    reason = "deploy-pipeline rolled back web@2.1.0->production"
    assert any(c.reason == reason and c.seq >= rolled_back.seq for c in anchored)


def test_error_rate_breach_in_bake_rolls_back(stack, baseline, use_config):
    from kmpops.stack.sample_service import generate_traffic

    use_config(lambda d: (no_staging(d), quick(d, approval_required=False, keep_analysis=True)))
    before = snapshot(stack)
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            for h in stack.hosts:
                if h.environment == "production":
                    generate_traffic(
                        f"http://127.0.0.1:{h.web_port}/work", requests=5, concurrency=1, timeout=1
                    )
            time.sleep(0.05)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        state = run_deploy(version="4.0.0", bake_seconds=2)
    finally:
        stop.set()
        thread.join(10)
    assert state.is_failed()
    text = failure_text(state)
    assert "bake of production batch 1/2" in text
    assert "error-ratio: 1 of 1 readings failed" in text and "does not meet < 0.05" in text
    assert snapshot(stack) == before


def test_sshd_killed_mid_rollout(stack, baseline, use_config):
    from kmpops.stack.sshd import crash_host, host_info, start_host

    use_config(lambda d: (no_staging(d), quick(d, approval_required=False)))
    before = snapshot(stack)
    prod = [h for h in stack.hosts if h.environment == "production"]
    victim = prod[2]
    info = host_info(Path(stack.root), victim.name, victim.port)
    killed = threading.Event()

    def kill() -> None:
        crash_host(info)  # its established sessions die with it, like a host going down
        killed.set()

    thread = when_switched(prod[0].root, "5.0.0", kill)
    try:
        state = run_deploy(version="5.0.0", bake_seconds=0)
    finally:
        thread.join(10)
        start_host(info)
    assert killed.is_set()
    assert state.is_failed()
    text = failure_text(state)
    assert victim.name in text and "HostUnreachable" in text
    assert snapshot(stack) == before
    release = Path(victim.root) / "srv/web/releases/5.0.0"
    assert not release.exists() or (release / ".kmpops-sha256").exists()


@pytest.fixture
def use_config_object(ops_config):
    """Run with a variant of the stack's validated config, handed over as an object (no YAML
    written): ``use_config_object({"dotted.path": value, ...})``."""
    from tasks.context import config_override
    from tests.flows.ops_variant import config_variant

    with contextlib.ExitStack() as stack:

        def apply(changes: dict | None = None):
            return stack.enter_context(config_override(config_variant(ops_config, changes or {})))

        yield apply


def test_dry_run_changes_nothing(stack, baseline, use_config_object):
    use_config_object()
    before = snapshot(stack)
    dirs = {h.name: sorted(os.listdir(Path(h.root) / "srv/web/releases")) for h in stack.hosts}
    state = run_deploy(version="6.0.0", dry_run=True)
    assert state.is_completed()
    result = state.result()
    assert result["status"] == "dry_run"
    assert result["plan"][1] == [["prd-1", "prd-2"], ["prd-3", "prd-4"]]
    assert snapshot(stack) == before
    assert dirs == {
        h.name: sorted(os.listdir(Path(h.root) / "srv/web/releases")) for h in stack.hosts
    }


def test_approval_rejected_rolls_back_staging(stack, baseline, use_config):
    use_config(lambda d: None)
    before = snapshot(stack)
    answering = answer_when_paused([approve("bob", decision="reject", reason="not today")])
    state = run_deploy(version="6.0.0", bake_seconds=0)
    answering.join(10)
    assert state.is_failed()
    assert "rejected by bob" in failure_text(state)
    assert snapshot(stack) == before


@pytest.mark.parametrize("version", ["1.0;rm -rf /", "../1.0", "1 0", "1..0"])
def test_bad_version_refused_before_anything(version):
    from pydantic import ValidationError

    from flows.deploy_pipeline import DeployRequest

    with pytest.raises(ValidationError, match="release version"):
        DeployRequest(service="web", version=version)


@pytest.mark.parametrize(
    ("field", "message"), [("service", "unknown service"), ("environment", "unknown environment")]
)
def test_unknown_service_or_environment(stack, baseline, use_config_object, field, message):
    use_config_object()
    before = snapshot(stack)
    state = run_deploy(version="6.0.0", **{field: "nope"})
    assert state.is_failed() and message in failure_text(state)
    assert snapshot(stack) == before


def test_freeze_refusal_and_emergency_override(stack, baseline, use_config):
    def mutate(d):
        no_staging(d)
        quick(
            d,
            freeze_windows=[
                {"name": "now", "start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}
            ],
        )

    use_config(mutate)
    before = snapshot(stack)
    state = run_deploy(version="6.0.0", bake_seconds=0)
    assert state.is_failed() and "freeze window 'now'" in failure_text(state)
    assert snapshot(stack) == before
    # emergency: quorum 1 + 1 -> two distinct approvers
    answering = answer_when_paused([approve("alice"), approve("bob")])
    state = run_deploy(version="6.0.0", bake_seconds=0, emergency=True)
    answering.join(10)
    assert not answering.errors
    assert state.is_completed(), failure_text(state)
    assert {v for k, v in snapshot(stack).items() if k.startswith("prd")} == {"6.0.0"}


def test_old_releases_are_pruned_once_a_host_is_healthy(stack, baseline, use_config_object):
    from tests.flows.ops_variant import DROP

    use_config_object(
        {
            "environments.staging": DROP,
            "environments.production.policy.approval_required": False,
            "services.web.analysis": [],
            "services.web.keep_releases": 2,
        }
    )
    prod = [h for h in stack.hosts if h.environment == "production"]
    before = snapshot(stack)
    state = run_deploy(version="7.0.0", bake_seconds=0)
    assert state.is_completed(), failure_text(state)
    result = state.result()
    for host in prod:
        left = sorted(os.listdir(Path(host.root) / "srv/web/releases"))
        # keep 2: the new one and the newest before it, which is the previous (never pruned)
        assert left == sorted({"7.0.0", before[host.name]}), host.name
        assert result["pruned"][host.name]  # the older releases went in this run
        assert set(result["pruned"][host.name]).isdisjoint(left)
    staging = [h for h in stack.hosts if h.environment == "staging"]
    assert all(current_of(h.root) == before[h.name] for h in staging)


def test_killed_deploy_is_recovered_when_its_run_turns_crashed(stack, baseline, use_config):
    """The process running the deploy is SIGKILLed mid-rollout (no in-process rollback can
    run); the served deploy-recover deployment's trigger puts every host back once the run
    is marked Crashed, as Prefect's runner does when it sees its flow process die."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Crashed

    from flows.deploy_recover import deploy_recover
    from kmpops.errors import PolicyViolation
    from tasks.common import records
    from tests.flows.alert_fixtures import wait_for_deployment_run
    from tests.serving import serve_subprocess, stop_process, wait_for_trigger

    def mutate(d):
        no_staging(d)
        quick(d, approval_required=False)

    config = use_config(mutate)
    before = snapshot(stack)
    prod = [h for h in stack.hosts if h.environment == "production"]
    name = f"recover-test-{uuid.uuid4().hex[:8]}"
    server = serve_subprocess(
        "from flows.deploy_recover import deploy_recover\n"
        "from tasks.deploy import recover_trigger\n"
        "from prefect import serve\n"
        f"serve(deploy_recover.to_deployment(name={name!r}, triggers=[recover_trigger()]))\n",
        config.parent / "serve-recover.log",
    )
    deploy = None
    try:
        wait_for_trigger(f"deploy-recover/{name}", server)
        deploy = serve_subprocess(
            "from flows.deploy_pipeline import DeployRequest, deploy_pipeline\n"
            "deploy_pipeline(DeployRequest(service='web', version='8.0.0', bake_seconds=0,"
            " requested_by='dave'))\n",
            config.parent / "deploy.log",
        )
        deadline = time.monotonic() + 120
        while not any(current_of(h.root) == "8.0.0" for h in prod):
            assert time.monotonic() < deadline and deploy.poll() is None, "no host switched"
            time.sleep(0.02)
        os.kill(deploy.pid, signal.SIGKILL)  # mid-rollout: nothing in that process runs again
        deploy.wait()
        assert any(current_of(h.root) == "8.0.0" for h in prod)
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=["deploy-web-8.0.0-production"])
                )
            )
            assert run.state.is_running()  # a zombie: nobody will end it
            # An operator's recover of a run shown Running is refused without force.
            state = deploy_recover(str(run.id), return_state=True)
            assert state.is_failed()
            with pytest.raises(PolicyViolation, match="force=True"):
                state.result()
            assert any(current_of(h.root) == "8.0.0" for h in prod)
            client.set_flow_run_state(run.id, Crashed(message="process died"), force=True)
        runs, done = wait_for_deployment_run(name, timeout=120)
        assert done and done[0].state.is_completed(), (runs, config.parent)
        assert snapshot(stack) == before
        rec = records()
        (event,) = [
            e
            for e in rec.audit_events(action="deploy.recovered")
            if e.details["crashed_run"] == str(run.id)
        ]
        assert event.details["hosts"] and not event.details["rollback_failed"]
        for host in prod:
            row = rec.current_release("web", "production", host.name)
            assert row.version == before[host.name]
        # Idempotent: a second recovery of the same run changes nothing.
        again = deploy_recover(f"prefect.flow-run.{run.id}")
        assert again["status"] == "already recovered"
        assert rec.verify_audit().ok
    finally:
        if deploy is not None and deploy.poll() is None:
            os.kill(deploy.pid, signal.SIGKILL)
            deploy.wait()
        stop_process(server)


def test_staging_failure_in_batch_two_switches_none_of_it(stack, baseline, use_config):
    """prd-3 already holds a different 9.0.0: staging batch 2 fails there, so the rollout stops
    before switching any of batch 2, and batch 1 is rolled back."""
    from tasks.common import records

    def mutate(d):
        no_staging(d)
        quick(d, approval_required=False)

    use_config(mutate)
    before = snapshot(stack)
    prod = {h.name: h for h in stack.hosts if h.environment == "production"}
    squatter = Path(prod["prd-3"].root) / "srv/web/releases/9.0.0"
    squatter.mkdir(parents=True)
    (squatter / "VERSION").write_text("not 9.0.0\n")
    try:
        state = run_deploy(version="9.0.0", bake_seconds=0)
    finally:
        shutil.rmtree(squatter)
    assert state.is_failed()
    text = failure_text(state)
    assert "while staging batch 2/2 (none of it switched)" in text
    assert "prd-3" in text and "exists with other content" in text
    assert snapshot(stack) == before
    events = records().audit_events(run_id=str(state.state_details.flow_run_id))
    switched = {e.subject.rsplit("/", 1)[-1] for e in events if e.action == "deploy.switch"}
    assert switched == {"prd-1", "prd-2"}  # batch 1 only, and it was rolled back
    rolled = {e.subject.rsplit("/", 1)[-1] for e in events if e.action == "deploy.rollback"}
    assert rolled == {"prd-1", "prd-2"}


def test_a_rollback_that_fails_is_flagged_and_notified(stack, baseline, use_config):
    """prd-1's previous release vanishes while batch 2 fails its health check: the rollback of
    prd-1 cannot land, so the host is audited, its release flagged and a critical notification
    sent; every other host is back."""
    from kmpops import become
    from kmpops import release as rel
    from kmpops.connectors.ssh import SSHConnection
    from tasks.common import ops_config, records

    def mutate(d):
        no_staging(d)
        quick(d, approval_required=False)
        flag_gated_health(d, retries=2)

    config = use_config(mutate)
    sink = Path(yaml.safe_load(config.read_text())["notifications"]["routes"]["critical"][0][7:])
    before = snapshot(stack)
    prod = {h.name: h for h in stack.hosts if h.environment == "production"}
    previous = Path(prod["prd-1"].root) / "srv/web/releases" / before["prd-1"]
    hidden = Path(prod["prd-1"].root) / f"hidden-{before['prd-1']}"  # beyond pruning's reach
    flags = [Path(prod[h].root) / "missing-dependency-of" for h in ("prd-3", "prd-4")]
    for flag in flags:
        flag.write_text("9.1.0\n")

    # once prd-1 is on 9.1.0, its way back is gone
    thread = when_switched(prod["prd-1"].root, "9.1.0", lambda: previous.rename(hidden))
    try:
        state = run_deploy(version="9.1.0", bake_seconds=0)
    finally:
        thread.join(10)
        for flag in flags:
            flag.unlink()
        if hidden.exists():
            hidden.rename(previous)
    assert state.is_failed()
    text = failure_text(state)
    assert "ROLLBACK FAILED on prd-1" in text and "not staged" in text
    after = snapshot(stack)
    assert after["prd-1"] == "9.1.0"  # left where it is, for a human
    assert {h: v for h, v in after.items() if h != "prd-1"} == {
        h: v for h, v in before.items() if h != "prd-1"
    }
    run = str(state.state_details.flow_run_id)
    rec = records()
    failed = [e for e in rec.audit_events(run_id=run) if e.action == "deploy.rollback_failed"]
    assert [e.subject for e in failed] == ["web/production/prd-1"]
    flagged = [r for r in rec.flagged_releases() if r.run_id == run]
    assert [(r.host, r.version) for r in flagged] == [("prd-1", "9.1.0")]
    notes = [json.loads(line) for line in sink.read_text().splitlines()]
    assert any("ROLLBACK FAILED: web 9.1.0" in json.dumps(n) for n in notes)
    # Put prd-1 back by hand, as the notification asks, for the tests that follow.
    cfg = ops_config()
    svc, host = cfg.service("web"), cfg.host("prd-1")[1]
    path = svc.deploy_path_for(host)
    values = {**host.template_values(), "deploy_path": path}
    restart = become.service_command(svc, "restart", host, values)  # sudo -n, as deploys do
    with SSHConnection.from_host(host) as conn:
        rel.switch_current(conn, path, before["prd-1"], restart=restart)
    assert snapshot(stack) == before


# -- verification: analysis of the real service, staging tests, evidence, marked-bad releases --


def staging_of(stack) -> dict[str, str | None]:
    return {h.name: current_of(h.root) for h in stack.hosts if h.environment == "staging"}


def kind(approval) -> str:
    """``request`` (the approval asked for, with its outcome) or ``answer`` (one answer)."""
    return (approval.details or {}).get("kind", "")


def analyses_of(state) -> list[dict]:
    from tasks.common import records

    run = str(state.state_details.flow_run_id)
    return [e.details for e in records().audit_events(action="deploy.analysis", run_id=run)]


def test_errors_variant_fails_in_staging_without_external_traffic(stack, baseline, use_config):
    """The finding: the errors variant (every other request fails) deployed to staging with an
    8-second bake ended ``deployed``, because nothing sent staging a request. Now the staging
    tests send the traffic and the analysis on Prometheus sees the errors; no other traffic."""
    use_config(
        lambda d: (
            staging_traffic_only_generates(d),
            d["environments"]["staging"]["policy"].update(bake_time="8s"),
        )
    )
    before = snapshot(stack)
    state = run_deploy(version="4.0.0", environment="staging")
    assert state.is_failed()
    text = failure_text(state)
    assert "verify monitoring on staging: analysis of web on staging failed" in text
    assert (
        "error-ratio: 1 of 1 readings failed (limit 0)" in text and "does not meet < 0.05" in text
    )
    assert "error-log: 1 of 1 readings failed" in text  # its ERROR lines since the switch
    assert "rolled back 2 host(s)" in text
    assert snapshot(stack) == before
    (analysis,) = analyses_of(state)
    assert (analysis["outcome"], analysis["source"]) == ("failed", "prometheus")
    # With the service's own expectations (every answer 200), its staging tests fail as well.
    use_config(lambda d: None)
    state = run_deploy(version="4.0.0", environment="staging")
    assert state.is_failed()
    text = failure_text(state)
    assert "integration tests on staging failed" in text and "unexpected 500 x 30" in text
    assert "analysis of web on staging failed" in text
    assert snapshot(stack) == before


def no_prometheus(data, *, scrape: bool) -> None:
    """No Prometheus in ops.yaml; the error-ratio measurement keeps its scrape fallback or not
    (and the log measurement goes, so only the metrics decide)."""
    data.pop("prometheus")
    web = data["services"]["web"]
    web["analysis"] = [m for m in web["analysis"] if m["name"] == "error-ratio"]
    if not scrape:
        web["analysis"][0].pop("scrape")
    staging_traffic_only_generates(data)


def test_without_prometheus_inconclusive_is_per_policy(stack, baseline, use_config):
    from tasks.common import records

    before = snapshot(stack)
    # policy "fail": no Prometheus and no scrape -> no data -> inconclusive -> rolled back
    use_config(lambda d: no_prometheus(d, scrape=False))
    state = run_deploy(version="4.0.0", environment="staging")
    assert state.is_failed()
    text = failure_text(state)
    assert "analysis of web on staging inconclusive" in text
    assert "no Prometheus configured and no scrape for this measurement" in text
    assert snapshot(stack) == before
    assert [a["outcome"] for a in analyses_of(state)] == ["inconclusive"]

    # policy "pause": a person decides; bob rejects, so it is rolled back, and the decision is
    # recorded like an approval
    def pausing(d):
        no_prometheus(d, scrape=False)
        d["environments"]["staging"]["policy"]["inconclusive"] = "pause"

    use_config(pausing)
    answering = answer_when_paused(
        [approve("bob", decision="reject", reason="no data, no deploy")],
        subject_prefix="analysis inconclusive",
    )
    state = run_deploy(version="4.0.0", environment="staging")
    answering.join(10)
    assert not answering.errors
    assert state.is_failed()
    assert "decision: rejected by bob" in failure_text(state)
    assert snapshot(stack) == before
    run = str(state.state_details.flow_run_id)
    (answer,) = [  # the decision (the requester's confirmation before it is its own record)
        a
        for a in records().approvals()
        if a.run_id == run and kind(a) == "answer" and a.outcome != "confirmed"
    ]
    assert answer.outcome == "rejected"
    assert answer.subject.startswith(
        "analysis inconclusive: web@4.0.0 verify monitoring on staging"
    )
    assert answer.approver == "bob"

    # the scrape fallback (metric names from ops.yaml) has data, and sees the errors
    use_config(lambda d: no_prometheus(d, scrape=True))
    state = run_deploy(version="4.0.0", environment="staging")
    assert state.is_failed()
    assert "error-ratio: 1 of 1 readings failed" in failure_text(state)
    assert [(a["outcome"], a["source"]) for a in analyses_of(state)] == [("failed", "scrape")]
    assert snapshot(stack) == before


def test_inconclusive_production_batch_pauses_for_a_decision(stack, baseline, use_config):
    """No users on production: each batch's bake has too little traffic to judge. The policy
    pauses for a person: alice lets batch 1 through, bob stops batch 2, everything goes back."""
    from tasks.common import records

    use_config(lambda d: (no_staging(d), quick(d, approval_required=False, keep_analysis=True)))
    before = snapshot(stack)
    answering = answer_when_paused(
        [approve("alice", reason="quiet hour, fine"), approve("bob", decision="reject")],
        subject_prefix="analysis inconclusive",
    )
    state = run_deploy(version="10.0.0", bake_seconds=1)
    answering.join(10)
    assert not answering.errors
    assert state.is_failed()
    text = failure_text(state)
    assert "bake of production batch 2/2" in text and "inconclusive" in text
    # nobody sends requests: Prometheus has no series yet, or a zero increase — both inconclusive
    assert "too little traffic" in text or "no data (the query returned no series)" in text
    assert "decision: rejected by bob" in text
    assert snapshot(stack) == before
    run = str(state.state_details.flow_run_id)
    decided = [
        (a.subject.split(" over ")[0], a.outcome, a.approver)
        for a in records().approvals()
        if a.run_id == run and kind(a) == "answer" and a.outcome != "confirmed"
    ]
    assert decided == [
        ("analysis inconclusive: web@10.0.0 bake of production batch 1/2", "approved", "alice"),
        ("analysis inconclusive: web@10.0.0 bake of production batch 2/2", "rejected", "bob"),
    ]
    assert [a["outcome"] for a in analyses_of(state)] == ["inconclusive", "inconclusive"]


def test_gates_read_their_evidence_on_the_real_store(stack, baseline, use_config):
    """A scan report with 12 critical findings and a tests record that is not JSON each fail
    their gate, with the reason in the checklist artifact; nothing is deployed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret

    use_config(lambda d: quick(d, approval_required=False))
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    scan_key = "evidence/web/11.0.0/security_scan.json"
    scan = json.loads(b"".join(store.iter_chunks(scan_key)))
    tests_key = "evidence/web/11.0.0/tests_passed.json"
    tests_record = b"".join(store.iter_chunks(tests_key))
    store.put_bytes(
        scan_key, json.dumps({**scan, "findings": {"critical": 12, "high": 3}}).encode()
    )
    store.put_bytes(tests_key, b'{"invalid": "not JSON"')
    before = snapshot(stack)
    try:
        state = run_deploy(version="11.0.0", bake_seconds=0)
    finally:
        store.put_bytes(scan_key, json.dumps(scan).encode())
        store.put_bytes(tests_key, tests_record)
    assert state.is_failed()
    assert "pre-deployment checklist failed: tests_passed, security_scan" in failure_text(state)
    assert snapshot(stack) == before
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    (artifact,) = [a for a in found if a.key == "deploy-checklist" and a.flow_run_id == run_id]
    rows = {r["gate"]: r for r in json.loads(artifact.data)}
    assert rows["security_scan"]["result"] == "FAIL"
    assert (
        "12 critical finding(s) (at most 0 allowed) by demo-scan"
        in rows["security_scan"]["evidence"]
    )
    assert rows["tests_passed"]["result"] == "FAIL"
    assert f"{tests_key}: not JSON" in rows["tests_passed"]["evidence"]
    assert {g for g, r in rows.items() if r["result"] == "pass"} == {
        "code_review",
        "dependencies_updated",
        "documentation_updated",
        "rollback_plan",
        "release_not_marked_bad",
    }


def test_release_marked_bad_is_refused_next_time(stack, baseline, use_config):
    """An incident's eradication marked 12.0.0 bad on prd-1: the checklist and update-management
    refuse it on every later deploy; an emergency override needs one more approver."""
    from flows.update_management import UpdateRequest, update_management
    from kmpops.errors import PolicyViolation
    from tasks.common import records

    use_config(lambda d: (no_staging(d), quick(d, approval_required=False)))
    rec = records()
    rec.audit(  # what incident-response's eradication writes
        actor="incident-response",
        action="release.marked_bad",
        subject="web/production/prd-1",
        details={"version": "12.0.0", "incident": 4242},
        run_id=None,
    )
    before = snapshot(stack)
    state = run_deploy(version="12.0.0", bake_seconds=0)
    assert state.is_failed()
    text = failure_text(state)
    assert "pre-deployment checklist failed: release_not_marked_bad" in text
    assert snapshot(stack) == before
    (event,) = [
        e
        for e in rec.audit_events(
            action="deploy.checklist", run_id=str(state.state_details.flow_run_id)
        )
    ]
    (row,) = [r for r in event.details["gates"] if r["gate"] == "release_not_marked_bad"]
    assert (
        "web 12.0.0 was marked bad: production/prd-1 by incident #4242 (refused" in row["evidence"]
    )
    with pytest.raises(PolicyViolation, match=r"web 12\.0\.0 was marked bad"):
        update_management(
            UpdateRequest(service="web", version="12.0.0", requested_by="dave", bake_seconds=0)
        )
    assert snapshot(stack) == before
    # the emergency override: production needs no approval here, but this needs one more
    answering = answer_when_paused([approve("alice", reason="hotfix, incident closed")])
    state = run_deploy(version="12.0.0", bake_seconds=0, emergency=True)
    answering.join(10)
    assert not answering.errors
    assert state.is_completed(), failure_text(state)
    assert {v for k, v in snapshot(stack).items() if k.startswith("prd")} == {"12.0.0"}
    run = str(state.state_details.flow_run_id)
    (request,) = [a for a in rec.approvals() if a.run_id == run and kind(a) == "request"]
    assert (request.outcome, request.approver) == ("approved", "alice")
    assert "web 12.0.0 was marked bad: production/prd-1 by incident #4242" in request.summary
    assert "EMERGENCY OVERRIDE (one more approver required)" in request.summary


# -- the shared approval step on its own (tasks.approval.request_approval) --------------------


def approval_probe_flow():
    from prefect import flow

    from tasks.approval import request_approval

    @flow(name="approval-probe")
    def approval_probe(policy_data: dict, timeout_s: float, required: int | None = None) -> dict:
        from kmpops.config import Policy

        outcome = request_approval(
            subject="probe change",
            summary_markdown="**probe**",
            policy=Policy.model_validate(policy_data),
            requested_by="alice",
            timeout_s=timeout_s,
            required=required,
        )
        return {
            "status": outcome.status,
            "approved": outcome.approved,
            "approved_by": list(outcome.approved_by),
            "refused": [list(r) for r in outcome.refused],
        }

    return approval_probe


POLICY = {
    "approval_required": True,
    "approvers": ["alice", "bob", "carol"],
    "quorum": 1,
    "four_eyes": True,
    "timeout_outcome": "reject",
}


def stack_policy(**extra):
    """POLICY checked against the local stack's token book (approval_required needs one)."""
    book = STACK_ROOT[0] / "secrets" / "approver_tokens"
    return {**POLICY, "approver_tokens": f"file:{book}", **extra}


@pytest.mark.parametrize(
    ("policy", "answers", "status", "approved_by", "refused"),
    [
        ({}, [approve("bob")], "approved", ["bob"], []),
        ({}, [approve("bob", decision="reject")], "rejected", [], []),
        (
            {},
            [approve("alice"), approve("carol")],
            "approved",
            ["carol"],
            [["alice", "self_approval"]],
        ),
        (
            {},
            [approve("mallory"), approve("bob")],
            "approved",
            ["bob"],
            [["mallory", "unknown_approver"]],
        ),
        (
            {"quorum": 2},
            [approve("bob"), approve("bob"), approve("carol")],
            "approved",
            ["bob", "carol"],
            [["bob", "duplicate_approver"]],
        ),
        (
            {"tokens": True},
            [approve("bob", token="wrong"), approve("bob", token="tok-bob")],
            "approved",
            ["bob"],
            [["bob", "bad_token"]],
        ),
    ],
    ids=["approve", "reject", "self-approval", "unknown-approver", "quorum-2", "token"],
)
def test_approval_step(stack, tmp_path, policy, answers, status, approved_by, refused):
    from kmpops.plans.approval import token_digest

    data = stack_policy(**policy)
    requester_token = None
    if data.pop("tokens", False):
        book = tmp_path / "approver-tokens"
        book.write_text("".join(f"{n}:{token_digest('tok-' + n)}\n" for n in data["approvers"]))
        data["approver_tokens"] = f"file:{book}"
        requester_token = "tok-alice"
    answering = answer_when_paused(
        answers, subject_prefix="probe", requester="alice", requester_token=requester_token
    )
    result = approval_probe_flow()(data, 60)
    answering.join(10)
    assert not answering.errors
    assert result["status"] == status
    assert result["approved_by"] == approved_by
    assert result["refused"] == refused


@pytest.mark.parametrize(("outcome", "approved"), [("reject", False), ("approve", True)])
def test_approval_timeout_applies_policy_outcome(stack, outcome, approved):
    started = time.monotonic()
    result = approval_probe_flow()(stack_policy(timeout_outcome=outcome), 2)
    assert result["status"] == "timed_out" and result["approved"] is approved
    assert time.monotonic() - started < 15


def test_approval_token_never_stored(stack, tmp_path):
    from tasks.common import records

    answering = answer_when_paused(
        [approve("bob", token="sekrit-token-123")], subject_prefix="probe", requester="alice"
    )
    approval_probe_flow()(stack_policy(), 60)
    answering.join(10)
    dump = " ".join(f"{a.details} {a.reason} {a.summary}" for a in records().approvals())
    dump += " ".join(records().export_audit())
    assert "sekrit-token-123" not in dump
