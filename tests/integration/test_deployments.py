"""How operators run kmp-ops flows, against the session stack's PostgreSQL-backed Prefect server.

- ``python -m deployments.serve --list`` shows the schedules, backup crons taken from ops.yaml;
- the real runner deployments of ``deployments.serve.build()`` served in a subprocess, runs
  started through the REST API and through the ``prefect`` CLI, each reaching Completed and
  leaving its audit event (with that run id) in the records store;
- ``deployments/prefect.yaml``: ``prefect deploy --all`` onto a ``process`` work pool, a process
  worker picking a run up.

Every subprocess is stopped by its pid (SIGTERM, wait, SIGKILL only if it hangs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.serving import stop_process

pytestmark = [pytest.mark.stack]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
SERVED = ("backup-configuration", "backup-database")
WORK_POOL = "kmp-ops"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _api(stack: Any) -> str:
    return str(stack.prefect["api_url"]).rstrip("/")


def deployment(stack: Any, flow: str, name: str | None = None) -> dict[str, Any] | None:
    """``GET /deployments/name/{flow}/{deployment}``, or None if it does not exist."""
    response = httpx.get(f"{_api(stack)}/deployments/name/{flow}/{name or flow}", timeout=10)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


def flow_run(stack: Any, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{_api(stack)}/flow_runs/{run_id}", timeout=10)
    response.raise_for_status()
    return response.json()


def wait_run(stack: Any, run_id: str, timeout: float = 90) -> dict[str, float | str]:
    """Follow a run to a final state; returns the seconds until it left SCHEDULED (pickup), until
    RUNNING, until final, and the final state type."""
    t0 = time.monotonic()
    seen: dict[str, float | str] = {}
    while time.monotonic() - t0 < timeout:
        state = flow_run(stack, run_id)["state_type"]
        now = time.monotonic() - t0
        if state != "SCHEDULED":
            seen.setdefault("pickup_s", now)
        if state == "RUNNING":
            seen.setdefault("running_s", now)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            seen.update(final_s=now, state=state)
            seen.setdefault("running_s", now)
            return seen
        time.sleep(0.1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout}s: {state}")


def audit_actions(stack: Any, run_id: str) -> list[str]:
    """Actions of the audit events that run ``run_id`` appended to the records store."""
    from kmpops.config import load_config
    from kmpops.records import Records

    with Records(load_config(Path(stack.ops_yaml)).records.url) as rec:
        return [event.action for event in rec.audit_events(run_id=run_id)]


def test_serve_list_shows_backup_crons_from_ops_yaml(stack: Any, tmp_path: Path) -> None:
    config = yaml.safe_load(Path(stack.ops_yaml).read_text())
    config["backups"]["database"]["schedule"] = "15 1 * * *"
    config["backups"]["configuration"]["schedule"] = "45 */4 * * *"
    custom = tmp_path / "ops.yaml"
    custom.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, "-m", "deployments.serve", "--list"],
        cwd=REPO,
        env=_env(KMPOPS_CONFIG=str(custom)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    listed = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert listed["backup-database"].strip() == "15 1 * * *"
    assert listed["backup-configuration"].strip() == "45 */4 * * *"
    assert listed["incident-response"].strip() == "on kmpops.alert.firing"
    assert listed["evaluate-alerts"].strip() == "every 60s"
    assert listed["approval-drill"].strip() == "manual"


class TestServed:
    """Runs of served deployments, started from the REST API and from the CLI."""

    @pytest.fixture(scope="class")
    def served(self, stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
        """``serve`` the real deployments of SERVED in a subprocess; stopped by pid after."""
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        t0 = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "integration" / "serve_subset.py"), *SERVED],
                cwd=REPO,
                env=_env(PREFECT_RUNNER_POLL_FREQUENCY="1"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"serve exited: {log.read_text()[-2000:]}"
                found = [deployment(stack, name) for name in SERVED]
                if all(d and d["status"] == "READY" for d in found):
                    break
                assert time.monotonic() < deadline, f"not served in time: {log.read_text()}"
                time.sleep(0.3)
            yield {"proc": proc, "log": log, "ready_s": time.monotonic() - t0}
        finally:
            stop_process(proc)

    def test_deployments_carry_their_schedules(self, stack: Any, served: dict) -> None:
        from deployments.serve import schedules
        from tasks.common import ops_config

        plans = schedules(ops_config())
        for name in SERVED:
            dep = deployment(stack, name)
            assert dep is not None and not dep["paused"]
            crons = [s["schedule"].get("cron") for s in dep["schedules"]]
            assert crons == [plans[name].cron]
            assert "kmp-ops" in dep["tags"]
        print(f"serve: deployments ready {served['ready_s']:.2f}s after start")

    def test_rest_api_run_completes_and_is_audited(
        self, stack: Any, served: dict, record_property: Any
    ) -> None:
        dep = deployment(stack, "backup-configuration")
        assert dep is not None
        t0 = time.monotonic()
        response = httpx.post(
            f"{_api(stack)}/deployments/{dep['id']}/create_flow_run",
            json={"parameters": {"hosts": ["stg-1"]}},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
        seen = wait_run(stack, run_id)
        total = time.monotonic() - t0
        assert seen["state"] == "COMPLETED", served["log"].read_text()[-3000:]
        assert "backup.completed" in audit_actions(stack, run_id)
        record_property("serve_pickup_s", round(float(seen["pickup_s"]), 2))
        record_property("rest_run_s", round(total, 2))
        print(
            f"REST run: picked up {seen['pickup_s']:.2f}s, running {seen['running_s']:.2f}s, "
            f"completed {total:.2f}s after POST"
        )

    def test_cli_run_completes_and_is_audited(self, stack: Any, served: dict) -> None:
        t0 = time.monotonic()
        out = subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "backup-database/backup-database",
                "--param",
                'databases=["app"]',
            ],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        run_id = match.group(1)
        cli_s = time.monotonic() - t0
        assert flow_run(stack, run_id)["parameters"] == {"databases": ["app"]}
        seen = wait_run(stack, run_id)
        assert seen["state"] == "COMPLETED", served["log"].read_text()[-3000:]
        assert "backup.completed" in audit_actions(stack, run_id)
        print(f"CLI run: command {cli_s:.2f}s, then completed {seen['final_s']:.2f}s later")

    def test_sigterm_to_serve_pauses_its_deployments(self, stack: Any, served: dict) -> None:
        """What the notes warn about, checked: a stopped serve process pauses what it served."""
        stop_process(served["proc"])
        assert served["proc"].returncode is not None
        for name in SERVED:
            dep = deployment(stack, name)
            assert dep is not None and dep["paused"] is True


def test_prefect_yaml_deploys_every_flow_to_a_process_pool(stack: Any, tmp_path: Path) -> None:
    from deployments.serve import discover, schedules
    from tasks.common import ops_config

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    entries = {d["name"]: d for d in spec["deployments"]}
    flows = {f.name for f in discover()}
    assert flows <= set(entries), (
        f"add deployments/prefect.yaml entries for {sorted(flows - set(entries))}"
    )
    plans = schedules(ops_config())
    for name, plan in plans.items():
        if name in entries and plan.cron:
            assert [s.get("cron") for s in entries[name].get("schedules", [])] == [plan.cron]

    env = _env(KMPOPS_HOME=str(REPO), PREFECT_WORKER_QUERY_SECONDS="1")
    subprocess.run(
        [PREFECT, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deploy_s = time.monotonic() - t0
    for name in flows:
        dep = deployment(stack, name)
        assert dep is not None and dep["work_pool_name"] == WORK_POOL, name
        assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        if plans.get(name) and plans[name].cron:
            assert [s["schedule"].get("cron") for s in dep["schedules"]] == [plans[name].cron]
    incident = deployment(stack, "incident-response")
    assert incident is not None
    related = httpx.get(
        f"{_api(stack)}/automations/related-to/prefect.deployment.{incident['id']}", timeout=10
    ).json()
    assert any("kmpops.alert.firing" in a["trigger"].get("expect", []) for a in related)
    # a crashed deploy starts deploy-recover, a crashed change request change-request-recover
    for name, crashed_flow in (
        ("deploy-recover", "deploy-pipeline"),
        ("change-request-recover", "change-request"),
    ):
        dep = deployment(stack, name)
        assert dep is not None, name
        autos = httpx.get(
            f"{_api(stack)}/automations/related-to/prefect.deployment.{dep['id']}", timeout=10
        ).json()
        assert any(
            "prefect.flow-run.Crashed" in a["trigger"].get("expect", [])
            and crashed_flow in str(a["trigger"].get("match_related"))
            for a in autos
        ), (name, autos)

    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            cwd=tmp_path,  # the pull step, not the worker's directory, sets where flows run
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        dep = deployment(stack, "backup-configuration")
        assert dep is not None
        t1 = time.monotonic()
        response = httpx.post(
            f"{_api(stack)}/deployments/{dep['id']}/create_flow_run",
            json={"parameters": {"hosts": ["stg-2"]}},
            timeout=10,
        )
        response.raise_for_status()
        run_id = response.json()["id"]
        seen = wait_run(stack, run_id, timeout=120)
        assert seen["state"] == "COMPLETED", worker_log.read_text()[-3000:]
        assert "backup.completed" in audit_actions(stack, run_id)
        print(
            f"prefect deploy --all: {deploy_s:.2f}s; worker run: picked up "
            f"{seen['pickup_s']:.2f}s, completed {time.monotonic() - t1:.2f}s after POST"
        )
    finally:
        stop_process(worker)
        # leave no schedules or alert triggers behind for the rest of the session
        for name in flows:
            dep = deployment(stack, name)
            if dep is not None:
                httpx.delete(f"{_api(stack)}/deployments/{dep['id']}", timeout=10)


def test_production_templates_hold_no_secrets_and_parse() -> None:
    """The env file template has no secret values; every unit reads it and parses in systemd."""
    production = REPO / "infra" / "production"
    settings = {}
    for line in (production / "kmpops.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    secretish = [
        k
        for k in settings
        if re.search(r"PASSWORD|SECRET|TOKEN|AUTH|KEY", k) and not k.endswith("_FILE")
    ]
    assert secretish == []
    assert not any("@" in v and "://" in v for v in settings.values())  # no URL with credentials
    assert {"KMPOPS_HOME", "KMPOPS_CONFIG", "PREFECT_API_URL", "KMPOPS_WORK_POOL"} <= set(settings)
    units = sorted(production.glob("*.service"))
    assert {u.name for u in units} == {
        "prefect-server.service",
        "kmpops-worker.service",
        "kmpops-serve.service",
        "kmpops-alertmanager-receiver.service",
    }
    analyze = Path("/usr/bin/systemd-analyze")
    for unit in units:
        assert "EnvironmentFile=/etc/kmp-ops/kmpops.env" in unit.read_text()
        if analyze.exists():
            out = subprocess.run(
                [str(analyze), "verify", "--man=no", str(unit)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            # the checkout is not installed here; anything else is a real problem
            problems = [
                line
                for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "is not executable" not in line
            ]
            assert problems == [], problems


def test_zombie_automation_marks_a_run_whose_heartbeats_stop_crashed(stack: Any) -> None:
    """A run that sent a heartbeat and then went silent is Crashed by the server (what starts
    deploy-recover for a deploy killed with its machine); the automation is applied once."""
    from datetime import timedelta

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.states import Running

    from deployments.automations import ZOMBIE_AUTOMATION, apply_automations

    @flow(name="zombie-probe")
    def probe() -> None:
        """Never run: its flow run is set Running by hand, like a process that then died."""

    with get_client(sync_client=True) as client:
        try:
            assert apply_automations(timedelta(seconds=10)) == [ZOMBIE_AUTOMATION]
            assert apply_automations(timedelta(seconds=10)) == []  # unchanged: left alone
            silent = client.create_flow_run(probe)
            client.set_flow_run_state(silent.id, Running(), force=True)
            emit_event(
                "prefect.flow-run.heartbeat",
                resource={"prefect.resource.id": f"prefect.flow-run.{silent.id}"},
            )
            EventsWorker.drain_all()
            deadline = time.monotonic() + 60
            while True:
                state = client.read_flow_run(silent.id).state
                assert state is not None
                if state.is_crashed():
                    break
                assert time.monotonic() < deadline, f"still {state.name} after 60 s"
                time.sleep(1)
            assert "no heartbeat" in (state.message or "")
        finally:
            for automation in client.read_automations_by_name(ZOMBIE_AUTOMATION):
                client.delete_automation(automation.id)
