"""Many workers, exactly once; a worker killed mid-deploy; scheduled runs really run.

Everything here is what ``infra/production/README.md`` tells an operator to run, against the
session stack's PostgreSQL-backed Prefect server, with the records store on PostgreSQL too:
``prefect work-pool create kmp-ops --type process``, ``prefect deploy`` from
``deployments/prefect.yaml``, ``python -m deployments.automations --within …`` (the zombie-run
automation), and two ``prefect worker start --pool kmp-ops --type process`` processes with a
short flow-run heartbeat (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30``, Prefect's minimum).

One worker pair serves the whole module (started once, stopped by pid at the end). The
services deployed are two copies of the sample service (``svc-a``, ``svc-b``) on the staging
hosts, on ports of this module's range, so nothing the rest of the suite reads is changed.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.flows.ops_variant import sudo_rules
from tests.serving import stop_process

pytestmark = [pytest.mark.stack]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "kmp-ops"
#: one API call to the Prefect server (a loaded 2-core machine answers some in 10-20 s)
API_S = 60
WORKERS = ("kmp-ops-worker-a", "kmp-ops-worker-b")
WORKER_LIMIT = 3  # concurrent runs per worker (`--limit`): a burst spreads over both
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY: Prefect 3.9's minimum
ZOMBIE_WITHIN_S = 50  # no heartbeat for this long -> Crashed (heartbeat period + 20 s slack)
DEPLOYED = ("deploy-pipeline", "deploy-recover", "backup-database", "evaluate-alerts")
SERVICES = {"svc-a": 820, "svc-b": 840}  # service -> port offset of its first host
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass
class Fleet:
    """What the module's fixture started."""

    api: str
    env: dict[str, str]
    records_url: str
    config: Path
    workers: dict[str, subprocess.Popen[bytes]]
    logs: Path
    deployed_at: datetime  # just before `prefect deploy`
    hosts: dict[str, str] = field(default_factory=dict)  # staging host -> root

    def tail(self) -> str:
        """The end of every worker log (for assertion messages)."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


# -- helpers ------------------------------------------------------------------------------


def cli(fleet_env: dict[str, str], *argv: str, timeout: float = 120) -> str:
    """Run one command from the repository root, as the operator does; its stdout."""
    done = subprocess.run(
        list(argv), cwd=REPO, env=fleet_env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def deployment_id(api: str, name: str) -> str:
    response = httpx.get(f"{api}/deployments/name/{name}/{name}", timeout=API_S)
    response.raise_for_status()
    return response.json()["id"]


def start_run(api: str, name: str, parameters: dict[str, Any]) -> str:
    """``POST /deployments/{id}/create_flow_run``: the run's id."""
    response = httpx.post(
        f"{api}/deployments/{deployment_id(api, name)}/create_flow_run",
        json={"parameters": parameters},
        timeout=API_S,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def flow_run(api: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/flow_runs/{run_id}", timeout=API_S)
    response.raise_for_status()
    return response.json()


def wait_final(api: str, run_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll until every run is final; raises AssertionError naming those that are not."""
    deadline = time.monotonic() + timeout
    runs: dict[str, dict[str, Any]] = {}
    while True:
        runs = {rid: flow_run(api, rid) for rid in run_ids}
        pending = {rid: r["state_type"] for rid, r in runs.items() if r["state_type"] not in FINAL}
        if not pending:
            return runs
        assert time.monotonic() < deadline, f"not final after {timeout:g}s: {pending}"
        time.sleep(0.5)


def filter_runs(api: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200, **body}, timeout=API_S)
    response.raise_for_status()
    return response.json()


def state_rows(api: str, run_id: str) -> list[dict[str, Any]]:
    """The run's states, oldest first."""
    response = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=API_S)
    response.raise_for_status()
    return sorted(response.json(), key=lambda s: s["timestamp"])


def submissions(api: str, since: datetime) -> dict[str, list[str]]:
    """flow run id -> the workers whose ``prefect.worker.submitted-flow-run`` event names it."""
    body = {
        "filter": {
            "event": {"name": ["prefect.worker.submitted-flow-run"]},
            "occurred": {"since": since.isoformat()},
        },
        "limit": 50,  # the API's page size
    }
    response = httpx.post(f"{api}/events/filter", json=body, timeout=API_S)
    response.raise_for_status()
    page = response.json()
    events = list(page["events"])
    for _ in range(20):  # at most 1,000 events: far more than this module makes
        if not page.get("next_page"):
            break
        response = httpx.get(page["next_page"], timeout=API_S)
        response.raise_for_status()
        page = response.json()
        events += page["events"]
    found: dict[str, list[str]] = collections.defaultdict(list)
    for event in events:
        worker = event["resource"].get("prefect.resource.name", "")
        for related in event.get("related", []):
            if related.get("prefect.resource.role") == "flow-run":
                run = related["prefect.resource.id"].removeprefix("prefect.flow-run.")
                found[run].append(worker)
    return found


def wait_submissions(api: str, since: datetime, run_ids: list[str]) -> dict[str, list[str]]:
    """The submissions of ``run_ids`` once every one has been persisted (events are written
    asynchronously), with a timeout."""
    deadline = time.monotonic() + 30
    while True:
        seen = submissions(api, since)
        if all(seen.get(rid) for rid in run_ids) or time.monotonic() > deadline:
            return {rid: seen.get(rid, []) for rid in run_ids}
        time.sleep(0.5)


def current_of(host_root: str, service: str) -> str | None:
    link = Path(host_root) / "srv" / service / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def process_of_run(run_id: str) -> tuple[int, int] | None:
    """(pid of the process running flow run ``run_id``, its parent's pid), from /proc."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
        except OSError:  # gone, or not ours
            continue
        return int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])
    return None


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        chain.append(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return chain


# -- the module's stack: records on PostgreSQL, pool, deployments, automation, two workers ----


def _variant(stack: Any, records_url: str, path: Path) -> None:
    """The stack's ops.yaml with records on PostgreSQL and two copies of the sample service."""
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["records"]["url"] = records_url
    # a records store of its own anchors to checkpoints of its own: the session's other
    # stores write theirs under the stack's prefix, and a foreign head reads as a truncation
    checkpoints = data["records"].get("checkpoints")
    if checkpoints and checkpoints.get("backend") == "s3":
        checkpoints["prefix"] = f"audit-checkpoints-workers-{uuid.uuid4().hex[:8]}/"
    elif checkpoints:
        checkpoints["path"] = str(path.with_name("audit-checkpoints.jsonl"))
    for env in data["environments"].values():
        for i, host in enumerate(env["hosts"]):
            for service, offset in SERVICES.items():
                host["vars"][f"{service.replace('-', '_')}_port"] = stack.port_base + offset + i
    web = data["services"]["web"]
    for service in SERVICES:
        port = "{" + service.replace("-", "_") + "_port}"
        svc = json.loads(json.dumps(web).replace("{web_port}", port))
        svc["deploy_path"] = "{root}/srv/" + service
        svc["config_paths"] = ["{root}/etc/" + service]
        for key in ("analysis", "staging_tests"):  # judged on health, integration and smoke
            svc.pop(key, None)
        data["services"][service] = svc
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _publish(stack: Any, config: Path, out: Path) -> None:
    """svc-a 1.0.0 and 2.0.0, svc-b 1.0.0 (sample-service tarballs + CI evidence) in S3."""
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    store = open_store(load_config(config).storage, resolve_secret)
    for service, version in (("svc-a", "1.0.0"), ("svc-a", "2.0.0"), ("svc-b", "1.0.0")):
        tarball = build_release(version, out / service, variant="good")
        put = store.put_bytes(f"releases/{service}/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(
                f"evidence/{service}/{version}/{gate}.json", json.dumps(record).encode()
            )


def _records_database(stack: Any) -> str:
    import psycopg

    name = f"records_workers_{uuid.uuid4().hex[:8]}"
    port = stack.port_base + 200
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"


def _wait_workers_online(api: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=API_S)
        online = {w["name"] for w in response.json() if w.get("status") == "ONLINE"}
        if set(WORKERS) <= online:
            return
        assert time.monotonic() < deadline, f"workers online after {timeout:g}s: {online}"
        time.sleep(0.5)


def _stop_services(fleet: Fleet) -> None:
    for root in fleet.hosts.values():
        for service in SERVICES:
            control = Path(root) / "srv" / service / "current" / "control"
            if control.exists():
                subprocess.run([str(control), "stop"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def fleet(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from deployments.automations import ZOMBIE_AUTOMATION
    from kmpops.records import Records

    base = tmp_path_factory.mktemp("workers")
    records_url = _records_database(stack)
    Records(records_url).migrate()
    config = base / "ops.yaml"
    _variant(stack, records_url, config)
    _publish(stack, config, base / "releases")
    api = str(stack.prefect["api_url"]).rstrip("/")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KMPOPS_HOME": str(REPO),
        "KMPOPS_CONFIG": str(config),
        "PREFECT_API_URL": api,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
    }
    # the commands of infra/production/README.md, in its order
    cli(env, PREFECT, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    deployed_at = datetime.now(UTC)  # before the deploy: its schedules start after this
    names = [arg for name in DEPLOYED for arg in ("--name", name)]
    cli(
        env,
        PREFECT,
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "deployments/prefect.yaml",
        *names,
        timeout=240,
    )
    cli(env, sys.executable, "-m", "deployments.automations", "--within", str(ZOMBIE_WITHIN_S))
    logs = base / "logs"
    logs.mkdir()
    workers: dict[str, subprocess.Popen[bytes]] = {}
    fleet = Fleet(api, env, records_url, config, workers, logs, deployed_at)
    fleet.hosts = {h.name: h.root for h in stack.hosts if h.environment == "staging"}
    rules = contextlib.ExitStack()  # svc-a and svc-b restart as root: their sudo rules
    try:
        rules.enter_context(sudo_rules(config))
        for name in WORKERS:
            with (logs / f"{name}.log").open("wb") as out:
                workers[name] = subprocess.Popen(
                    [
                        *(PREFECT, "worker", "start", "--pool", POOL, "--type", "process"),
                        *("--name", name, "--limit", str(WORKER_LIMIT)),
                    ],
                    cwd=base,  # the pull step, not the worker's directory, sets where flows run
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        _wait_workers_online(api)
        yield fleet
    finally:
        for proc in workers.values():
            stop_process(proc)
        for name in DEPLOYED:
            response = httpx.get(f"{api}/deployments/name/{name}/{name}", timeout=API_S)
            if response.status_code == 200:
                dep = response.json()["id"]  # its trigger's automation first: it outlives it
                httpx.delete(f"{api}/automations/owned-by/prefect.deployment.{dep}", timeout=API_S)
                httpx.delete(f"{api}/deployments/{dep}", timeout=API_S)
        automations = httpx.post(f"{api}/automations/filter", json={}, timeout=API_S).json()
        for automation in automations:
            if automation["name"] == ZOMBIE_AUTOMATION:
                httpx.delete(f"{api}/automations/{automation['id']}", timeout=API_S)
        _stop_services(fleet)
        rules.close()


# -- tests ----------------------------------------------------------------------------------


def _deploy(service: str, version: str, **extra: Any) -> dict[str, Any]:
    return {
        "request": {
            "service": service,
            "version": version,
            "environment": "staging",
            "requested_by": "dave",
            **extra,
        }
    }


def test_a_burst_over_two_workers_runs_every_run_exactly_once(fleet: Fleet) -> None:
    from kmpops.records import Records

    burst = [
        ("deploy-pipeline", _deploy("svc-a", "1.0.0", allow_first_install=True)),
        ("deploy-pipeline", _deploy("svc-b", "1.0.0", allow_first_install=True)),
        ("backup-database", {"databases": ["app"]}),
        ("backup-database", {"databases": ["app"]}),
        ("evaluate-alerts", {"rules": ["error_rate"], "start_incidents": "none"}),
        ("evaluate-alerts", {"rules": ["error_rate"], "start_incidents": "none"}),
        ("evaluate-alerts", {"rules": ["error_rate"], "start_incidents": "none"}),
    ]
    since = datetime.now(UTC) - timedelta(seconds=5)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(burst)) as pool:  # all at once
        run_ids = list(pool.map(lambda job: start_run(fleet.api, *job), burst))
    kinds = dict(zip(run_ids, (name for name, _ in burst), strict=True))
    runs = wait_final(fleet.api, run_ids, timeout=300)
    print(f"burst of {len(run_ids)} runs over 2 workers: all final {time.monotonic() - t0:.1f}s")

    # Prefect's view: one Completed per requested run, each run once, by exactly one worker
    assert {rid: r["state_type"] for rid, r in runs.items()} == dict.fromkeys(
        run_ids, "COMPLETED"
    ), fleet.tail()
    for rid in run_ids:
        # claimed once (Pending), then the claiming worker's Submitting; a second claim
        # (Pending -> Pending) is what the server refuses. (run_count is no execution count:
        # a run's Running states while it waits for a lock count too.)
        named = [(r["type"], r["name"]) for r in state_rows(fleet.api, rid)]
        assert named.count(("PENDING", "Pending")) == 1, (kinds[rid], named)
        assert named.count(("PENDING", "Submitting")) <= 1, (kinds[rid], named)
        assert named[0][0] == "SCHEDULED" and named[-1][0] == "COMPLETED", (kinds[rid], named)
        assert not {"CRASHED", "FAILED"} & {t for t, _ in named}, (kinds[rid], named)
    by_worker = wait_submissions(fleet.api, since, run_ids)
    assert {rid: len(w) for rid, w in by_worker.items()} == dict.fromkeys(run_ids, 1), by_worker
    assert {w for (w,) in by_worker.values()} == set(WORKERS)  # the limit spread the burst
    for name in DEPLOYED:  # no run of these deployments that nobody asked for (no schedule yet)
        dep = deployment_id(fleet.api, name)
        extra = [
            r["id"]
            for r in filter_runs(fleet.api, {"deployments": {"id": {"any_": [dep]}}})
            if r["id"] not in kinds and not r["auto_scheduled"]
        ]
        assert extra == [], name

    # the records' view: each run's audit events once, and the chain intact
    with Records.from_config(_config(fleet)) as rec:
        for rid in run_ids:
            actions = collections.Counter(e.action for e in rec.audit_events(run_id=rid))
            assert actions["lock.acquired"] == 1 and actions["lock.released"] == 1, actions
            if kinds[rid] == "deploy-pipeline":
                assert actions["deploy.requested"] == 1 and actions["deploy.completed"] == 1
            if kinds[rid] == "backup-database":
                assert actions["backup.completed"] == 1, actions
        assert rec.verify_audit().ok
        for service in SERVICES:
            for host, root in fleet.hosts.items():
                assert current_of(root, service) == "1.0.0"
                row = rec.current_release(service, "staging", host)
                assert row is not None and row.version == "1.0.0"
        app_backups = [b for b in rec.backups() if b.name == "app" and b.state == "complete"]
        assert len(app_backups) == 2

        # the locks' view: per target, one holder at a time, every tenure ended
        tenures = collections.defaultdict(list)
        for grant in rec.lease_history():
            tenures[grant.target].append(grant)
        assert [lease for lease in rec.leases() if lease.holder in kinds] == []
    for target, grants in tenures.items():
        assert [g.fence for g in grants] == list(range(1, len(grants) + 1)), target
        for held, after in itertools.pairwise(grants):
            assert held.ended_at is not None and held.ended_at <= after.acquired_at, (
                target,
                held.holder,
                after.holder,
            )
        # every tenure of a requested run ended by its own release (only a run of the
        # evaluate-alerts schedule, nobody's request, may be holding its lock right now)
        ours = [g for g in grants if g.holder in kinds]
        assert [g.ended_how for g in ours] == ["released"] * len(ours), target
    holders = {g.holder for grants in tenures.values() for g in grants}
    assert set(run_ids) <= holders
    # the burst did contend: both deploys took the staging hosts, the evaluations their lock
    for host in fleet.hosts:
        assert {g.holder for g in tenures[f"host:{host}"]} >= set(run_ids[:2])
    assert len(tenures["procedure:evaluate-alerts"]) >= 3
    assert len(tenures["database:app"]) >= 2


def _config(fleet: Fleet) -> Any:
    from kmpops.config import load_config

    return load_config(fleet.config)


def test_a_worker_killed_mid_deploy_crashes_the_run_and_recovery_puts_the_hosts_back(
    fleet: Fleet,
) -> None:
    from kmpops.records import Records

    before = {host: current_of(root, "svc-a") for host, root in fleet.hosts.items()}
    assert set(before.values()) == {"1.0.0"}  # what the burst left
    since = datetime.now(UTC) - timedelta(seconds=5)
    deploy = start_run(fleet.api, "deploy-pipeline", _deploy("svc-a", "2.0.0"))
    deadline = time.monotonic() + 180
    while not any(current_of(root, "svc-a") == "2.0.0" for root in fleet.hosts.values()):
        state = flow_run(fleet.api, deploy)["state_type"]
        assert state not in FINAL and time.monotonic() < deadline, (state, fleet.tail())
        time.sleep(0.02)
    found = process_of_run(deploy)
    assert found is not None, "no process runs the deploy"
    child, _ = found
    (victim,) = [n for n, p in fleet.workers.items() if p.pid in ancestors(child)]
    os.kill(fleet.workers[victim].pid, signal.SIGKILL)  # the machine is gone: worker...
    os.kill(child, signal.SIGKILL)  # ...and the run's process, nothing of them runs again
    fleet.workers[victim].wait(timeout=API_S)
    killed = time.monotonic()
    switched = {h for h, root in fleet.hosts.items() if current_of(root, "svc-a") == "2.0.0"}
    assert switched and flow_run(fleet.api, deploy)["state_type"] == "RUNNING"  # a zombie

    # the other worker goes on taking work while the zombie waits for its heartbeat to lapse
    later = start_run(fleet.api, "backup-database", {"databases": ["app"]})
    (done,) = wait_final(fleet.api, [later], timeout=120).values()
    assert done["state_type"] == "COMPLETED", fleet.tail()
    survivor = next(n for n in WORKERS if n != victim)
    assert wait_submissions(fleet.api, since, [later])[later] == [survivor]

    crashed = wait_final(fleet.api, [deploy], timeout=ZOMBIE_WITHIN_S + 90)[deploy]
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    assert "no heartbeat" in crashed["state"]["message"]
    print(f"killed mid-deploy: Crashed {time.monotonic() - killed:.1f}s after SIGKILL")

    # the Crashed event started deploy-recover, which the surviving worker ran
    recover_dep = deployment_id(fleet.api, "deploy-recover")
    deadline = time.monotonic() + 120
    while True:
        recovers = [
            r
            for r in filter_runs(fleet.api, {"deployments": {"id": {"any_": [recover_dep]}}})
            if deploy in str(r["parameters"].get("flow_run_id", ""))
        ]
        if recovers and all(r["state_type"] in FINAL for r in recovers):
            break
        assert time.monotonic() < deadline, f"deploy-recover not done: {recovers}"
        time.sleep(0.5)
    assert [r["state_type"] for r in recovers] == ["COMPLETED"], fleet.tail()
    print(f"deploy-recover completed {time.monotonic() - killed:.1f}s after SIGKILL")
    assert wait_submissions(fleet.api, since, [recovers[0]["id"]])[recovers[0]["id"]] == [survivor]

    assert {host: current_of(root, "svc-a") for host, root in fleet.hosts.items()} == before
    with Records.from_config(_config(fleet)) as rec:
        for host in fleet.hosts:
            row = rec.current_release("svc-a", "staging", host)
            assert row is not None and row.version == "1.0.0", host
        (recovered,) = [
            e
            for e in rec.audit_events(action="deploy.recovered")
            if e.details["crashed_run"] == deploy
        ]
        # "stg-1: 2.0.0 -> 1.0.0" for every host the dead run had switched
        assert {h.split(":", 1)[0] for h in recovered.details["hosts"]} >= switched
        assert all(h.endswith("2.0.0 -> 1.0.0") for h in recovered.details["hosts"])
        assert not recovered.details["rollback_failed"]
        assert all(lease.holder != deploy for lease in rec.leases())  # its locks are free
        dead = [g for g in rec.lease_history() if g.holder == deploy]
        assert dead and all(g.ended_at is not None for g in dead)
        # freed for the dead run by deploy-recover (or taken over once its TTL had passed)
        assert {g.ended_how for g in dead} <= {"released_dead", "expired"}
        assert rec.verify_audit().ok


def test_the_servers_scheduler_creates_a_run_that_a_worker_completes(fleet: Fleet) -> None:
    """evaluate-alerts' schedule in deployments/prefect.yaml (every 60 s): the server's
    scheduler creates the runs, nobody asks for them, a worker runs one to Completed."""
    dep = deployment_id(fleet.api, "evaluate-alerts")
    schedules = httpx.get(f"{fleet.api}/deployments/{dep}", timeout=API_S).json()["schedules"]
    assert [s["schedule"].get("interval") for s in schedules] == [60.0]
    deadline = time.monotonic() + 150
    while True:
        scheduled = [
            r
            for r in filter_runs(fleet.api, {"deployments": {"id": {"any_": [dep]}}})
            if r["auto_scheduled"]
        ]
        done = [r for r in scheduled if r["state_type"] == "COMPLETED"]
        if done:
            break
        seen = [(r["state_type"], r["expected_start_time"]) for r in scheduled]
        assert time.monotonic() < deadline, f"no scheduled run completed: {seen}"
        time.sleep(1)
    run = done[0]
    assert run["parameters"] == {}  # the schedule's run: no one passed anything
    history = [(r["type"], r["name"]) for r in state_rows(fleet.api, run["id"])]
    assert history[0][0] == "SCHEDULED" and history[-1][0] == "COMPLETED", history
    assert history.count(("PENDING", "Pending")) == 1, history
    (worker,) = wait_submissions(fleet.api, fleet.deployed_at, [run["id"]])[run["id"]]
    assert worker in WORKERS
    start = datetime.fromisoformat(run["expected_start_time"])
    assert start > fleet.deployed_at  # a time the schedule chose after the deploy
