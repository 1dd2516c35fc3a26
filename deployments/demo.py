"""`make demo`: the embedded stack and the guide's main procedures, end to end.

1. starts the local stack (Prefect server on SQLite, records on SQLite, six sshd hosts, SeaweedFS,
   PostgreSQL, Prometheus) under ``var/stack``;
2. builds a release of the sample service and runs ``deploy-pipeline``: checklist, staging,
   integration tests, monitoring check, production approval (answered here as ``kmpops approve``
   would: ``dave``, who asked, confirms with his token, then ``alice`` approves with hers),
   rolling batches, verification, bake;
3. backs up the sample database, verifies the backup by restoring it into a scratch database;
4. serves every procedure as a deployment (``kmpops serve`` in the background, schedules paused),
   so each can be started from the UI, and waits until all of them are READY;
5. prints what a person can check: each host's ``current`` release read from the host itself, the
   backup's checksum and restored row counts, the audit chain, the Prefect UI address.

Running it again deploys the next release (the previous one stays on the hosts for rollback).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PORT_BASE = 17000


def _env(root: Path, info: Any) -> None:
    os.environ["PREFECT_API_URL"] = info.prefect["api_url"]
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_HOME"] = str(root / "prefect-client")
    os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "false"
    os.environ["KMPOPS_CONFIG"] = info.ops_yaml
    os.environ.setdefault("KMPOPS_ACTOR", "demo-operator")


def _auto_approver(root: Path, api_url: str, stop: threading.Event) -> None:
    """Answer every paused deploy-pipeline run the way `kmpops approve` does: dave, who asked
    for the deploy, confirms it with his token; then alice approves it with hers.

    A poll that fails (a busy SQLite-backed server answers 503 while it is locked) is retried
    until ``stop`` is set: the thread never dies silently and leaves the approval to time out.
    """
    from prefect.client.orchestration import get_client

    answered: set[str] = set()  # paused states answered (one answer per pause)
    with get_client(sync_client=True) as client:
        while not stop.is_set():
            try:
                _answer_paused(client, root, api_url, answered)
            except Exception as err:  # the server is busy: try again, never die
                print(f"  approval: could not answer yet ({type(err).__name__}: {err}); retrying")
            stop.wait(0.5)


def _answer_paused(client: Any, root: Path, api_url: str, answered: set[str]) -> None:
    """One poll: answer each paused state not answered yet (dave confirms, alice approves)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from kmpops.approve import approve_run, pending_request
    from kmpops.errors import KmpOpsError
    from kmpops.stack import approver_token

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
        )
    )
    for run in runs:
        if run.state is None or str(run.state.id) in answered:
            continue
        time.sleep(1.0)  # let a person watching the UI see the paused run
        try:
            asked = pending_request(api_url, str(run.id))
        except KmpOpsError:
            continue  # resumed meanwhile, or not an approval
        confirming = "Waiting for the requester" in asked.description
        who, decision = ("dave", "confirm") if confirming else ("alice", "approve")
        approve_run(
            api_url,
            str(run.id),
            decision=decision,
            approver=who,
            reason="demo: staging green, change reviewed",
            token=approver_token(root, who),
            request_code=asked.request_code,
        )
        answered.add(str(run.state.id))
        print(f"  approval: {who} answered {decision} on paused run {run.name}")


def _serve_deployments(root: Path, timeout: float = 300.0) -> list[str]:
    """(Re)start ``kmpops serve`` in the background with schedules paused; wait until every flow's
    deployment is READY (the new process polls for its runs).

    The process runs detached with its pid in ``root/serve/serve.pid`` (``make stack-down`` stops
    it), logs to ``root/serve/serve.log`` and serves every flow as a deployment, so each procedure
    can be started from the UI. A serve process left by an earlier demo is replaced, so a second
    `make demo` serves the code and config it just used. Returns the deployments' names; raises
    RuntimeError naming the missing ones if they do not all appear within ``timeout`` seconds.
    """
    from prefect.client.orchestration import get_client

    from deployments.serve import discover
    from kmpops.stack._proc import read_pid, start_process, stop_process

    pid_file, log_file = root / "serve" / "serve.pid", root / "serve" / "serve.log"
    stop_process(pid_file, timeout=15.0)
    wanted = {fl.name for fl in discover()}
    argv = [sys.executable, "-m", "deployments.serve", "--schedules", "paused"]
    env = {"PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONUNBUFFERED": "1"}
    start_process(argv, pid_file=pid_file, log_file=log_file, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if read_pid(pid_file) is None:
                raise RuntimeError(f"the serve process exited; see {log_file}")
            found = {  # READY: this process polls for their runs (not just an old registration)
                d.name
                for d in client.read_deployments()
                if d.name in wanted and d.status is not None and d.status.value == "READY"
            }
            if found == wanted:
                return sorted(found)
            time.sleep(0.5)
    missing = ", ".join(sorted(wanted - found))
    raise RuntimeError(f"not served (READY) within {timeout:.0f}s: {missing}; see {log_file}")


def _next_version(root: Path) -> str:
    counter = root / "demo-runs"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return f"1.{n}.0"


def _host_current(cfg: Any, service: str) -> list[tuple[str, str, str]]:
    """(environment, host, version) read from each host's ``current`` symlink over SSH."""
    from kmpops.connectors.ssh import SSHConnection

    rows = []
    svc = cfg.service(service)
    for env_name, env in cfg.environments.items():
        for host in env.hosts:
            with SSHConnection.from_host(host) as conn:
                res = conn.run(["readlink", f"{svc.deploy_path_for(host)}/current"], timeout=10)
            version = Path(res.stdout.strip()).name if res.ok else "(none)"
            rows.append((env_name, host.name, version))
    return rows


def _publish(cfg: Any, tarball: Path, version: str) -> str:
    """Do what CI does before a deploy: store the artifact and the checklist's evidence records."""
    import hashlib
    import json

    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence

    store = open_store(cfg.storage, resolve_secret)
    with tarball.open("rb") as fh:
        put = store.put_stream(f"releases/web/{version}.tar.gz", fh)
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert put.sha256 == sha
    # what the checklist's gates read: review by someone other than the author, test counts,
    # scan findings by severity, dependency status, the changelog entry — bound to this sha256
    for gate, record in ci_evidence(version, sha, author="demo-operator").items():
        store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())
    return sha


def _users(info: Any, stop: threading.Event) -> None:
    """Production's users: a trickle of requests to every production host (what each batch's
    bake analysis judges; staging gets its traffic from the service's staging tests)."""
    from kmpops.connectors.traffic import send_traffic

    hosts = [h for h in info.hosts if h.environment == "production"]
    while not stop.is_set():
        for host in hosts:
            send_traffic(
                f"http://127.0.0.1:{host.web_port}/work", requests=3, concurrency=1, timeout=1
            )
        stop.wait(0.05)


def _deploy(root: Path, info: Any, cfg: Any, version: str) -> dict[str, Any]:
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline
    from kmpops.stack.sample_service import build_release

    releases = root / "releases"
    releases.mkdir(exist_ok=True)
    tarball = build_release(version, releases)
    sha = _publish(cfg, tarball, version)
    print(f"  published releases/web/{version}.tar.gz (sha256 {sha[:12]}…) with CI evidence")
    stop = threading.Event()
    approver = threading.Thread(
        target=_auto_approver, args=(root, info.prefect["api_url"], stop), daemon=True
    )
    approver.start()
    users = threading.Thread(target=_users, args=(info, stop), daemon=True)
    users.start()
    try:
        return deploy_pipeline(
            DeployRequest(
                service="web",
                version=version,
                environment="production",
                requested_by="dave",
                allow_first_install=True,
            )
        )
    finally:
        stop.set()
        approver.join(timeout=5)
        users.join(timeout=5)


def _backup_verify_restore(cfg: Any) -> dict[str, Any]:
    """backup-database → verify-backups → restore-database into a new database; count rows."""
    import psycopg

    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups

    backups = backup_database(databases=["app"])
    verify_backups(databases=["app"], hosts=[], apply_retention=False)
    target = "app_restored_demo"
    db = cfg.databases["app"]
    # The previous demo's scratch copy goes first: restore-database refuses to overwrite a
    # scratch database that exists (only the configured database itself is ever replaced).
    admin = f"host={db.host} port={db.port} user={db.user} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
    restore_database(database="app", target_dbname=target)
    counts = {}
    for dbname in ("app", target):
        dsn = f"host={db.host} port={db.port} user={db.user} dbname={dbname}"
        with psycopg.connect(dsn) as conn:
            counts[dbname] = {
                table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("customers", "orders")
            }
    return {"backup": backups[-1], "counts": counts}


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(description="kmp-ops end-to-end demo")
    parser.add_argument("--root", type=Path, default=REPO / "var" / "stack")
    parser.add_argument("--port-base", type=int, default=PORT_BASE)
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()

    from kmpops import stack

    print(f"Starting the local stack under {root} …")
    info = stack.up(stack.StackSpec(root=root, port_base=args.port_base, prefect_db="sqlite"))
    print(f"  stack up in {info.started_s}s ({len(info.hosts)} hosts)")
    _env(root, info)
    # A serve process left by an earlier demo is replaced at the end; stopped first, so it does not
    # compete with this run's flows for the SQLite-backed server.
    from kmpops.stack._proc import stop_process

    stop_process(root / "serve" / "serve.pid", timeout=15.0)

    from kmpops.config import load_config

    cfg = load_config(info.ops_yaml)
    version = _next_version(root)
    print(f"Deploying web {version}: staging → approval → production …")
    t0 = time.monotonic()
    result = _deploy(root, info, cfg, version)
    deploy_s = time.monotonic() - t0
    print(f"  deploy-pipeline finished: {result.get('status')} in {deploy_s:.1f}s")

    print("Backing up the sample database and verifying the backup by restoring it …")
    backup = _backup_verify_restore(cfg)

    print("Serving every procedure as a deployment (schedules paused) …")
    served = _serve_deployments(root)
    serve_dir = root / "serve"
    serve_pid = (serve_dir / "serve.pid").read_text().strip()
    print(f"  {len(served)} deployments served by pid {serve_pid} (log: {serve_dir / 'serve.log'})")

    from kmpops.records import Records

    records = Records.from_config(cfg)
    chain = records.verify_audit()
    rows = _host_current(cfg, "web")

    print()
    print("=" * 72)
    print("kmp-ops demo — what to check")
    print("=" * 72)
    print(f"Prefect UI:        {info.prefect['ui_url']}  (flow runs, artifacts, approvals)")
    print(f"Config:            {info.ops_yaml}")
    print(f"Records (SQLite):  {cfg.records.url}")
    print(f"Notifications:     {info.notifications}")
    print(f"Deployed version:  {version}")
    print("Host      env         current release (read from the host)")
    for env_name, host, current in rows:
        mark = "ok" if current == version else "!!"
        print(f"  {host:8s} {env_name:11s} {current:10s} {mark}")
    record = records.backup(int(backup["backup"]["record_id"]))
    print(f"Backup #{record.id}:         {record.key}")
    print(f"  sha256 {record.sha256}, {record.size} bytes, verification: {record.verification}")
    for dbname, counts in backup["counts"].items():
        print(f"  rows in {dbname:18s} {counts}")
    print(f"Audit chain:       {'intact' if chain.ok else 'BROKEN'} ({chain.events} events)")
    ui = info.prefect["ui_url"]
    print(f"Deployments:       {len(served)} procedures served, schedules paused")
    print("Try one yourself:")
    print(f"  1. open {ui}/deployments, click deploy-pipeline, then Run → Custom run")
    print('  2. request: {"service": "web", "version": "' + version + '",')
    print('               "environment": "production", "requested_by": "dave"} → Submit')
    print("  3. the run pauses twice; each time click Resume on its page: first dave confirms his")
    print("     request (decision confirm, his token), then alice approves it (decision approve,")
    print(f"     her token); the tokens are {root / 'secrets'}/approver-<name>.token")
    print("  A schedule is turned on from its deployment's page (toggle next to the schedule).")
    print("Stop everything:   make stack-down")
    ok = chain.ok and all(current == version for _, _, current in rows)
    ok = ok and backup["counts"]["app"] == backup["counts"]["app_restored_demo"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
