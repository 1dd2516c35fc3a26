"""`make demo`: the embedded stack and the guide's main procedures, end to end.

1. starts the local stack (Prefect server on SQLite, records on SQLite, six sshd hosts, SeaweedFS,
   PostgreSQL, Prometheus) under ``var/stack``;
2. builds a release of the sample service and runs ``deploy-pipeline``: checklist, staging,
   integration tests, monitoring check, production approval (answered here as ``alice`` with her
   approver token, exactly as ``kmpops approve`` would), rolling batches, verification, bake;
3. backs up the sample database, verifies the backup by restoring it into a scratch database;
4. prints what a person can check: each host's ``current`` release read from the host itself, the
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
    """Answer every paused deploy-pipeline run as alice, the way `kmpops approve` does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from kmpops.approve import approve_run
    from kmpops.stack import approver_token

    answered: set[str] = set()
    token = approver_token(root, "alice")
    with get_client(sync_client=True) as client:
        while not stop.is_set():
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            for run in runs:
                if str(run.id) in answered:
                    continue
                time.sleep(1.0)  # let a person watching the UI see the paused run
                approve_run(
                    api_url,
                    str(run.id),
                    decision="approve",
                    approver="alice",
                    reason="demo: staging green, change reviewed",
                    token=token,
                )
                answered.add(str(run.id))
                print(f"  approval: alice approved paused run {run.name}")
            stop.wait(0.5)


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
                requested_by="demo-operator",
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
    restore_database(database="app", target_dbname=target, environment="development")
    db = cfg.databases["app"]
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

    from kmpops.records import Records

    records = Records(cfg.records.url)
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
    print("Stop everything:   make stack-down")
    ok = chain.ok and all(current == version for _, _, current in rows)
    ok = ok and backup["counts"]["app"] == backup["counts"]["app_restored_demo"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
