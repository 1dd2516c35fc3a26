"""Target locks on the real stack: concurrent deploys serialised, a dead holder's lease taken
over after its TTL (and its stale fencing number refused), key rotation waiting for a deploy
of the same hosts, and the ``refuse`` policy naming the holder.

Concurrent runs are separate processes (``tests.serving.serve_subprocess``), like two runs
started from the UI; each prints its final state as one JSON line that the test reads back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

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
RELEASES = {"L1.0": "good", "L2.0-errors": "errors", "L2.1": "good", "L3.0": "good"}


def current_of(host_root: str) -> str | None:
    link = Path(host_root) / "srv" / "web" / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def production(stack) -> list:
    return [h for h in stack.hosts if h.environment == "production"]


def snapshot(stack) -> dict[str, str | None]:
    return {h.name: current_of(h.root) for h in stack.hosts}


def lock_variant(data: dict, *, analysis: bool = False, **locks) -> None:
    """Production only, no approval; short leases so a dead holder expires within seconds.

    Deploys go on health checks alone unless ``analysis`` (then an inconclusive analysis fails
    instead of pausing: the run that needs it sends traffic)."""
    data["environments"].pop("staging", None)
    data["environments"]["production"]["policy"].update(approval_required=False)
    if analysis:
        data["environments"]["production"]["policy"]["inconclusive"] = "fail"
    else:
        data["services"]["web"].pop("analysis", None)
    # a TTL long enough for renewals on a loaded 2-core machine, short enough to wait out
    data["locks"] = {"ttl": 15, "renew_interval": 1, "poll_interval": 0.2, **locks}


@pytest.fixture(scope="module")
def lock_config(stack, tmp_path_factory) -> Path:
    """The stack's ops.yaml with :func:`lock_variant` applied (KMPOPS_CONFIG points at it)."""
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    lock_variant(data)
    path = tmp_path_factory.mktemp("locks") / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def use_lock_config(lock_config, monkeypatch) -> Path:
    monkeypatch.setenv("KMPOPS_CONFIG", str(lock_config))
    return lock_config


@pytest.fixture(scope="module")
def lock_releases(stack, tmp_path_factory) -> dict[str, str]:
    """Publish the releases these tests deploy (tarball + checklist evidence) to the stack's S3;
    the errors release fails 30 % of its requests."""
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    out = tmp_path_factory.mktemp("lock-releases")
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    for version, variant in RELEASES.items():
        tarball = build_release(
            version, out, variant=variant, parameter=0.3 if variant == "errors" else None
        )
        put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())
    return RELEASES


@pytest.fixture(scope="module")
def lock_baseline(stack, lock_releases, lock_config) -> None:
    """L1.0 on every production host (first install where the hosts have nothing yet)."""
    from tests.flows.ops_variant import first_install

    first_install(lock_config, "L1.0")


DEPLOY_CODE = """
import json, time
from pathlib import Path
from flows.deploy_pipeline import DeployRequest, deploy_pipeline
go = Path({go!r})
print("READY", flush=True)
while {go!r} and not go.exists():
    time.sleep(0.02)
state = deploy_pipeline(DeployRequest(service='web', version={version!r}, bake_seconds={bake},
                                      requested_by='dave', allow_first_install=True),
                        return_state=True)
print("RESULT " + json.dumps({{"type": state.type.value, "message": state.message or ""}}))
"""


def start_deploy(
    version: str, bake: float, log: Path, go: Path | None = None
) -> subprocess.Popen[bytes]:
    """A deploy in its own process; with ``go`` it imports everything, prints READY and
    starts the run only once the file ``go`` exists (so a test can start it at a chosen
    moment of another run, whatever the machine's load)."""
    from tests.serving import serve_subprocess

    code = DEPLOY_CODE.format(version=version, bake=bake, go=str(go) if go else "")
    proc = serve_subprocess(code, log)
    if go is not None:
        wait_until(lambda: "READY" in log.read_text() or proc.poll() is not None, "READY")
    return proc


def finished(proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> dict:
    """Wait for a run's process; its RESULT line (the final state type and message)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
    assert lines, f"no result from the run; log {log}"
    return json.loads(lines[-1].removeprefix("RESULT "))


class Traffic:
    """Requests to every production host's /work until stopped (what a bake measures)."""

    def __init__(self, stack) -> None:
        from kmpops.stack.sample_service import generate_traffic

        self._stop = threading.Event()
        hosts = production(stack)

        def run() -> None:
            while not self._stop.is_set():
                for h in hosts:
                    generate_traffic(
                        f"http://127.0.0.1:{h.web_port}/work", requests=5, concurrency=1, timeout=1
                    )
                time.sleep(0.05)

        self._thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)


# -- (a) two deploys of the same service and environment ----------------------------------


def test_concurrent_deploys_are_serialised(
    stack, lock_baseline, use_lock_config, tmp_path, monkeypatch
):
    """Run A (30 % errors, bake 8 s) and run B (good) start 2.5 s apart: B waits for A's lock,
    so A's bake measures A's release (it fails and rolls back) and B then deploys over it."""
    from tasks.common import records

    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    lock_variant(data, analysis=True)  # the bakes judge the release by its error ratio
    judged = tmp_path / "ops-analysis.yaml"
    judged.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(judged))

    prod = production(stack)
    before = {h.name: current_of(h.root) for h in prod}
    log_a, log_b = tmp_path / "deploy-a.log", tmp_path / "deploy-b.log"
    go_b = tmp_path / "go-b"
    with Traffic(stack):
        run_b = start_deploy("L2.1", 2, log_b, go=go_b)  # imported, waiting for its start
        run_a = start_deploy("L2.0-errors", 8, log_a)
        wait_until(
            lambda: any(current_of(h.root) == "L2.0-errors" for h in prod) or run_a.poll(),
            "run A to switch a host",
        )
        time.sleep(2.5)  # as in the finding: B starts 2.5 s after A began switching
        go_b.touch()
        result_a = finished(run_a, log_a)
        result_b = finished(run_b, log_b)
    assert result_a["type"] == "FAILED", result_a
    assert "bake" in result_a["message"] and "error-ratio" in result_a["message"], result_a
    assert result_b["type"] == "COMPLETED", result_b
    # B waited visibly for A's lock, naming A's run: in its log and its Prefect state
    assert "waiting for lock: host:prd-1 is held by run deploy-web-L2.0-errors-production" in (
        log_b.read_text()
    )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (run_b_info,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=["deploy-web-L2.1-production"])
            )
        )
        waits = [s for s in client.read_flow_run_states(run_b_info.id) if s.name == "AwaitingLock"]
    assert waits and "held by run deploy-web-L2.0-errors-production" in waits[0].message
    rec = records()
    for host in prod:
        assert current_of(host.root) == "L2.1", host.name
        assert rec.current_release("web", "production", host.name).version == "L2.1"
    # A's bake measured A's release: its rollback put back what the hosts had before A
    rollbacks = [
        e
        for e in rec.audit_events(action="deploy.rollback")
        if e.details["rolled_back"] == "L2.0-errors"
    ]
    assert {e.details["to"] for e in rollbacks} == set(before.values())


# -- the lease table on PostgreSQL: processes racing, a stale fence refused -------------------

RACE = """
import sys
from kmpops.records import Records
won, busy = Records(sys.argv[1]).acquire_leases(
    ["service:web@production", "host:prd-1"], holder=sys.argv[2], holder_name=sys.argv[2],
    ttl_seconds=60)
print("WON" if len(won) == 2 else "BUSY")
"""


def test_postgres_lease_race_has_one_winner_and_fences_hold(stack, tmp_path):
    import sys
    import uuid

    import psycopg

    from kmpops.locks import LeaseLost
    from kmpops.records import Records

    name = f"leases_{uuid.uuid4().hex[:8]}"
    port = stack.port_base + 200
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"
    rec = Records(url)
    rec.migrate()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, url, f"racer-{i}"],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outcomes
    assert sorted(out.strip() for out, _ in outcomes) == ["BUSY"] * 5 + ["WON"]
    held = rec.lease("service:web@production")
    assert held is not None and held.fence == 1
    (stale,) = [f for f in rec.leases() if f.target == "host:prd-1"]
    assert stale.holder == held.holder  # both targets went to the same single winner
    from kmpops.locks import Fence

    fence = Fence(target=held.target, holder=held.holder, number=held.fence)
    rec.release_leases_of(held.holder)
    (newer,), _ = rec.acquire_leases(
        [held.target], holder="next", holder_name="next-run", ttl_seconds=60
    )
    with pytest.raises(LeaseLost, match="taken over by run next-run with fence 2"):
        rec.record_release(
            service="web", environment="production", host="prd-1", version="x", fence=fence
        )
    rec.record_release(
        service="web", environment="production", host="prd-1", version="y", fence=newer
    )
    assert rec.current_release("web", "production", "prd-1").version == "y"
    rec.close()


# -- (b) a holder that dies: its lease expires, is taken over, and its fence is refused ------

HOLDER_CODE = """
import time
from prefect import flow
from kmpops.locks import service_target
from tasks.locks import RunLocks

@flow(name="lock-holder", flow_run_name="lock-holder-{tag}")
def hold() -> None:
    with RunLocks([service_target("web", "production")]):
        print("HELD", flush=True)
        time.sleep(600)

hold()
"""


def start_holder(tag: str, log: Path) -> subprocess.Popen[bytes]:
    """A run in another process that takes web@production's lease and keeps renewing it."""
    from tasks.common import records
    from tests.serving import serve_subprocess

    proc = serve_subprocess(HOLDER_CODE.replace("{tag}", tag), log)
    wait_until(
        lambda: (
            proc.poll() is not None
            or (records().lease("service:web@production") or _free()).holder_name
            == f"lock-holder-{tag}"
        ),
        "the holder to take its lease",
    )
    assert proc.poll() is None, log.read_text()
    return proc


def _free():
    from kmpops.locks import LeaseView

    return LeaseView("", None, "", 0, None, None)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_killed_holder_is_taken_over_after_expiry_and_cannot_record(
    stack, lock_baseline, use_lock_config, tmp_path
):
    from typer.testing import CliRunner

    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from kmpops.cli import app
    from kmpops.locks import Fence, LeaseLost
    from tasks.common import records

    rec = records()
    holder = start_holder("killed", tmp_path / "holder.log")
    held = rec.lease("service:web@production")
    stale = Fence(target=held.target, holder=held.holder, number=held.fence)
    listing = CliRunner().invoke(app, ["locks", "--config", str(use_lock_config)])
    assert listing.exit_code == 0
    assert "lock-holder-killed" in listing.output and held.holder in listing.output
    kill(holder)  # SIGKILL: no release, no more renewals

    state = deploy_pipeline(
        DeployRequest(service="web", version="L3.0", bake_seconds=0, requested_by="dave"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    run_id = str(state.state_details.flow_run_id)
    (acquired,) = rec.audit_events(action="lock.acquired", run_id=run_id)
    assert acquired.details["fences"]["service:web@production"] == stale.number + 1
    for host in production(stack):
        assert current_of(host.root) == "L3.0"
    # The dead run's fence is refused: it cannot record over the newer run's release.
    with pytest.raises(LeaseLost, match=f"taken over .* with fence {stale.number + 1}"):
        rec.record_release(
            service="web", environment="production", host="prd-1", version="L1.0", fence=stale
        )
    row = rec.current_release("web", "production", "prd-1")
    assert row.version == "L3.0" and row.fence == stale.number + 1


STALLED_CODE = """
import time
from pathlib import Path
from prefect import flow
from kmpops.locks import LeaseLost, service_target
from tasks.common import records
from tasks.locks import RunLocks, fence_for

@flow(name="lock-holder", flow_run_name="lock-holder-stalled")
def hold() -> None:
    target = service_target("web", "production")
    with RunLocks([target]):
        print("HELD", flush=True)
        go = Path({go!r})
        while not go.exists():
            time.sleep(0.05)
        try:
            records().record_release(service="web", environment="production", host="prd-1",
                                     version="stale", fence=fence_for(target))
            print("RECORDED", flush=True)
        except LeaseLost as exc:
            print("REFUSED " + str(exc), flush=True)

hold()
"""


def test_stalled_holder_cannot_record_after_a_newer_run_took_over(
    stack, lock_baseline, use_lock_config, tmp_path
):
    """The holder process is stopped (SIGSTOP: no renewals, like a long GC pause or a frozen
    VM) until its lease expires and a deploy takes the target; resumed, it tries to record a
    release under its old fence and is refused."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from tasks.common import records
    from tests.serving import serve_subprocess

    rec = records()
    go = tmp_path / "go"
    log = tmp_path / "stalled.log"
    proc = serve_subprocess(STALLED_CODE.replace("{go!r}", repr(str(go))), log)
    try:
        wait_until(lambda: "HELD" in log.read_text() or proc.poll() is not None, "HELD")
        assert proc.poll() is None, log.read_text()
        os.kill(proc.pid, signal.SIGSTOP)
        state = deploy_pipeline(
            DeployRequest(service="web", version="L1.0", bake_seconds=0, requested_by="dave"),
            return_state=True,
        )
        assert state.is_completed(), state.message
        os.kill(proc.pid, signal.SIGCONT)
        go.touch()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            kill(proc)
    text = log.read_text()
    assert "RECORDED" not in text
    assert "REFUSED write refused: the lease on service:web@production" in text
    assert "taken over by run deploy-web-L1.0-production" in text
    row = rec.current_release("web", "production", "prd-1")
    assert row.version == "L1.0" and current_of(production(stack)[0].root) == "L1.0"


# -- (d) policy "refuse": the second run fails at once, naming the holder ------------------


def test_refuse_policy_names_the_holder_and_changes_nothing(
    stack, lock_baseline, monkeypatch, tmp_path
):
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from kmpops.locks import LockBusy
    from tasks.common import records

    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    lock_variant(data, procedures={"deploy-pipeline": {"on_busy": "refuse"}})
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(path))
    before = snapshot(stack)
    holder = start_holder("refuse", tmp_path / "holder.log")
    try:
        state = deploy_pipeline(
            DeployRequest(service="web", version="L2.1", bake_seconds=0, requested_by="dave"),
            return_state=True,
        )
    finally:
        kill(holder)
    assert state.is_failed()
    with pytest.raises(LockBusy) as err:
        state.result()
    text = str(err.value)
    assert "refused (locks.on_busy=refuse)" in text
    assert "service:web@production is held by run lock-holder-refuse" in text and "since" in text
    assert snapshot(stack) == before
    run_id = str(state.state_details.flow_run_id)
    # refused before the procedure began: only the lock events (the hosts it had taken before
    # reaching the held target were released again), no deploy step
    actions = [e.action for e in records().audit_events(run_id=run_id)]
    assert actions == ["lock.refused", "lock.released"]


# -- (c) key rotation during a deploy of the same hosts waits for it ---------------------------


def test_key_rotation_waits_for_a_deploy_of_the_same_hosts(
    stack, lock_baseline, monkeypatch, tmp_path
):
    """Runs last: it really rotates the stack's client key (every host keeps working with
    the new one)."""
    from flows.rotate_service_keys import RotationRequest, rotate_service_keys
    from tasks.common import records

    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["environments"]["production"]["policy"].update(approval_required=False)
    data["services"]["web"].pop("analysis", None)  # about the locks: health checks alone
    data["locks"] = {"ttl": 15, "renew_interval": 1, "poll_interval": 0.2}
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(path))
    rec = records()
    log = tmp_path / "deploy.log"
    deploy = start_deploy("L2.1", 3, log)
    try:
        wait_until(
            lambda: (
                deploy.poll() is not None
                or any(
                    v.holder_name == "deploy-web-L2.1-production" and v.target.startswith("host:")
                    for v in rec.leases()
                )
            ),
            "the deploy to take its host locks",
        )
        state = rotate_service_keys(RotationRequest(), return_state=True)
    finally:
        result = finished(deploy, log)
    assert result["type"] == "COMPLETED", result
    assert state.is_completed(), state.message
    rotation_run = str(state.state_details.flow_run_id)
    deploy_done = [e for e in rec.audit_events(action="deploy.completed")][-1]
    assert deploy_done.subject == "web@L2.1->production"
    (taken,) = rec.audit_events(action="lock.acquired", run_id=rotation_run)
    (rotated,) = rec.audit_events(action="access.rotated", run_id=rotation_run)
    # the rotation took the hosts only after the deploy had finished with them
    assert deploy_done.seq < taken.seq < rotated.seq
    assert sorted(rotated.details["hosts"]) == sorted(h.name for h in stack.hosts)
    assert all(current_of(h.root) == "L2.1" for h in stack.hosts)
