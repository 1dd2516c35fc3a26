"""Benchmark: the production stage of deploy-pipeline on N sshd hosts vs Ansible, pyinfra, paramiko.

The same deploy on every host, by each contender: upload a 5 MiB release tarball (.tar.gz of an
incompressible payload), verify its sha256 on the host, extract it into
``<host>/srv/app/releases/<version>``, switch ``current`` atomically, restart (``control
restart``), health check (``control health``), keep 3 releases.

    .venv/bin/python bench/bench_deploy.py --hosts 50

(a) kmp-ops: the ``deploy-pipeline`` flow (checklist, plan, rolling batches, smoke checks, bake 0,
    no approval, release records, audit chain), orchestrated by the PostgreSQL-backed Prefect
    server of the local stack; (b) the floor: ``ThreadPoolExecutor`` (one thread per host) +
    paramiko, SFTP put + one script per host; (c) pyinfra (``files.put`` + ``server.shell``,
    ``--parallel N``) and (d) ``ansible-playbook`` (forks=N, pipelining on; ``copy`` +
    ``command``), each installed into its own virtualenv under ``--venvs`` by this script.
    (a), (b), (c) alternate, median of ``--runs``; Ansible runs ``--ansible-runs`` times (it
    is slow). Then the rollback: a release whose health check fails on every host is deployed
    with batch 100%, and the pipeline's compensation puts all N hosts back; its time is read
    from the ``deploy.rolled_back`` audit event. Every run checks afterwards that each host's
    ``current`` is the expected release.

Measured 2026-12-01 (2 cores, 50 hosts, median of 5): kmp-ops 5.15 s (run Completed on the
server at 5.02 s), paramiko floor 4.56 s (kmp-ops 1.13x), pyinfra 5.42 s (kmp-ops 0.95x),
Ansible 33.1 s (6.4x slower than kmp-ops); rollback of 50 hosts 1.56 s. See bench/README.md.

``--locks-ab`` also runs (a) with target locks switched off in every run, alternating which goes
first. Measured 2026-12-02 (2 cores, load average 9-18, 50 hosts, median of 5): with locks
11.63 s, without 11.89 s (-2.1 %; run Completed -3.2 %), client CPU 2.9 s vs 2.8 s; single runs
spread 9.4-14.1 s, so the difference is inside the noise. A first version that acquired,
renewed and released with two statements per target measured +6.6 % (16.21 s vs 15.21 s).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kmpops import stack  # noqa: E402

CONTROL = b"""#!/bin/sh
# The bench service's control script.
here=$(cd "$(dirname "$0")" && pwd)
case "$1" in
  restart) date +%s > "$here/restarted" ;;
  health)
    test -f "$here/restarted" || { echo "not restarted" >&2; exit 1; }
    if [ -f "$here/UNHEALTHY" ]; then echo "unhealthy build" >&2; exit 1; fi
    test -s "$here/payload.bin" && echo healthy ;;
  *) echo "usage: control restart|health" >&2; exit 2 ;;
esac
"""

# The whole host step for (b), (c), (d): verify, extract, switch atomically, restart, health,
# keep 3. Arguments: deploy path, version, sha256, uploaded tarball.
ACTIVATE = textwrap.dedent(
    """\
    set -eu; cd "$1"; v=$2; sha=$3; tgz=$4
    echo "$sha  $tgz" | sha256sum -c --status
    mkdir -p releases; rm -rf "releases/$v.partial"; mkdir "releases/$v.partial"
    tar -xzf "$tgz" -C "releases/$v.partial" --no-same-owner; rm -f "$tgz"
    rm -rf "releases/$v"; mv -T "releases/$v.partial" "releases/$v"
    ln -sfn "releases/$v" current.tmp; mv -T current.tmp current
    current/control restart; current/control health
    for old in $(ls -1t releases | tail -n +4); do rm -rf "releases/$old"; done
    """
)


def make_release(directory: Path, version: str, size: int, *, unhealthy: bool = False) -> Path:
    """A .tar.gz release (incompressible payload, control script, VERSION) + ``.sha256``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        files = [
            ("payload.bin", os.urandom(size), 0o644),
            ("control", CONTROL, 0o755),
            ("VERSION", f"{version}\n".encode(), 0o644),
        ]
        if unhealthy:
            files.append(("UNHEALTHY", b"1\n", 0o644))
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    path = directory / f"app-{version}.tar.gz"
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return path


def sha_of(path: Path) -> str:
    return path.with_name(path.name + ".sha256").read_text().split()[0]


# -- the stack and kmp-ops' configuration ----------------------------------------------------


def write_ops_yaml(info: stack.StackInfo, root: Path, batch: str) -> Path:
    """The stack's ops.yaml made into the bench's: production only, no approval, bake 0, the
    bench service, records and evidence under ``root``."""
    cfg = yaml.safe_load(Path(info.ops_yaml).read_text())
    production = cfg["environments"]["production"]
    production["policy"] = {"approval_required": False, "batch_size": batch, "max_failures": 0}
    production.pop("packages", None)  # not this bench's work; --ab-tree's older checkouts refuse it
    cfg["environments"] = {"production": production}
    cfg["records"] = {
        "url": f"sqlite:///{root / 'records.db'}",
        "audit_key": cfg["records"]["audit_key"],
    }
    cfg["notifications"] = {"routes": {"critical": [f"jsonl://{root / 'notifications.jsonl'}"]}}
    cfg["storage"] = {"backend": "local", "path": str(root / "objects")}
    cfg.pop("databases", None)
    cfg["services"] = {
        "app": {
            "deploy_path": "{root}/srv/app",
            "keep_releases": 3,
            "restart": "{deploy_path}/current/control restart",
            "health_check": {"command": "{deploy_path}/current/control health", "retries": 1},
        }
    }
    path = root / "ops.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def publish_evidence(root: Path, version: str, sha256: str) -> None:
    """The checklist's evidence records (what CI would publish) in the local store."""
    from kmpops.stack import ci_evidence

    for gate, record in ci_evidence(version, sha256, author="bench").items():
        path = root / "objects" / "evidence" / "app" / version / f"{gate}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))


def run_kmpops(version: str, tarball: Path, *, first: bool = False) -> float:
    """Run the pipeline in this process; returns seconds from the call until the Prefect
    server recorded the run's final state (what the UI shows as done). Raises if it failed."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client

    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    started = datetime.now(UTC)
    state = deploy_pipeline(
        DeployRequest(
            service="app",
            version=version,
            environment="production",
            artifact=str(tarball),
            bake_seconds=0,
            requested_by="bench",
            allow_first_install=first,
        ),
        return_state=True,
    )
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    result = state.result()  # raises the flow's error
    assert run.end_time is not None
    stages = ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items())
    print(f"  {'    ... stages (s)':<34} {stages}", flush=True)
    assert run.start_time is not None
    print(
        f"  {'    ... Running after (s)':<34} {(run.start_time - started).total_seconds():7.2f}",
        flush=True,
    )
    return (run.end_time - started).total_seconds()


@contextlib.contextmanager
def locks_disabled() -> object:
    """For ``--locks-ab`` only: run the pipeline as before target locks (no leases taken,
    renewed or released, no fence checks on the release records)."""
    import tasks.locks as locks

    saved = locks.RunLocks.__enter__, locks.RunLocks.__exit__
    locks.RunLocks.__enter__ = lambda self: self  # type: ignore[method-assign]
    locks.RunLocks.__exit__ = lambda self, *exc: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        locks.RunLocks.__enter__, locks.RunLocks.__exit__ = saved  # type: ignore[method-assign]


# The same pipeline run from another checkout of kmp-ops (``--ab-tree``), in a process of its own:
# a dry run first (imports, the Prefect client, first connections: paid by both trees alike),
# then the timed deploy; one JSON line back.
AB_CHILD = """
import json, sys, time
sys.path.insert(0, {tree!r})
from datetime import UTC, datetime
from prefect.client.orchestration import get_client
from flows.deploy_pipeline import DeployRequest, deploy_pipeline
def request(**kw):
    return DeployRequest(service="app", environment="production", artifact={tarball!r},
                         bake_seconds=0, requested_by="bench", **kw)
deploy_pipeline(request(version={version!r}, dry_run=True))
started = datetime.now(UTC); t0 = time.perf_counter()
state = deploy_pipeline(request(version={version!r}), return_state=True)
call = time.perf_counter() - t0
result = state.result()
with get_client(sync_client=True) as client:
    run = client.read_flow_run(state.state_details.flow_run_id)
print("AB " + json.dumps({{"call": call, "completed": (run.end_time - started).total_seconds(),
                          "timings": result["timings"]}}), flush=True)
"""


def run_tree(tree: Path, version: str, tarball: Path) -> dict[str, Any]:
    """One timed deploy by the checkout ``tree`` (its flows/tasks/kmpops first on the path),
    in a fresh process; returns ``{"call": s, "completed": s, "timings": {...}}``."""
    code = AB_CHILD.format(tree=str(tree), tarball=str(tarball), version=version)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("AB ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(lines[-1][3:])


# -- (b) the floor: paramiko + a thread pool ---------------------------------------------------


def paramiko_deploy(
    host: stack.StackHost, info: stack.StackInfo, tarball: Path, version: str
) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(info.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=host.port,
        username="root",
        key_filename=info.key_file,
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    try:
        base = f"{host.root}/srv/app"
        remote = f"{base}/.incoming/{version}.tar.gz"
        client.exec_command(f"mkdir -p {base}/.incoming")[1].channel.recv_exit_status()
        sftp = client.open_sftp()
        sftp.put(str(tarball), remote, confirm=False)
        sftp.close()
        args = " ".join(shlex.quote(a) for a in (base, version, sha_of(tarball), remote))
        _, stdout, stderr = client.exec_command(f"sh -c {shlex.quote(ACTIVATE)} activate {args}")
        out, err = stdout.read(), stderr.read()
        status = stdout.channel.recv_exit_status()
        if status != 0 or b"healthy" not in out:
            raise RuntimeError(f"{host.name}: exit {status}: {err[-300:]!r}")
    finally:
        client.close()


def run_floor(info: stack.StackInfo, tarball: Path, version: str, workers: int) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(paramiko_deploy, h, info, tarball, version) for h in info.hosts]
        for future in futures:
            future.result()


# -- (c) pyinfra and (d) Ansible, each in its own virtualenv --------------------------------


def venv(venvs: Path, name: str, requirements: list[str]) -> Path:
    """``<venvs>/<name>`` with ``requirements`` installed (once)."""
    target = venvs / name
    marker = target / ".installed"
    if not marker.exists() or marker.read_text() != " ".join(requirements):
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        subprocess.run(
            [str(target / "bin" / "pip"), "install", "--quiet", *requirements], check=True
        )
        marker.write_text(" ".join(requirements))
    return target / "bin"


PYINFRA_DEPLOY = """\
import os
from pyinfra import host
from pyinfra.operations import files, server

base = host.data.root + "/srv/app"
env = os.environ
version, sha, tarball = env["BENCH_VERSION"], env["BENCH_SHA"], env["BENCH_TARBALL"]
remote = f"{base}/.incoming/{version}.tar.gz"
files.directory(name="incoming", path=f"{base}/.incoming")
files.put(name="upload", src=tarball, dest=remote)
server.shell(
    name="activate",
    commands=["sh -c " + env["BENCH_SCRIPT_Q"] + f" activate {base} {version} {sha} {remote}"],
)
"""


def setup_pyinfra(work: Path, info: stack.StackInfo) -> Path:
    hosts = [
        (
            h.name,
            {
                "ssh_hostname": "127.0.0.1",
                "ssh_port": h.port,
                "ssh_user": "root",
                "ssh_key": info.key_file,
                "ssh_known_hosts_file": info.known_hosts,
                "ssh_strict_host_key_checking": "yes",
                "root": h.root,
            },
        )
        for h in info.hosts
    ]
    (work / "inventory.py").write_text(f"hosts = {hosts!r}\n")
    (work / "deploy.py").write_text(PYINFRA_DEPLOY)
    return work


def run_pyinfra(bin_dir: Path, work: Path, tarball: Path, version: str, parallel: int) -> None:
    env = {
        **os.environ,
        "BENCH_VERSION": version,
        "BENCH_SHA": sha_of(tarball),
        "BENCH_TARBALL": str(tarball),
        "BENCH_SCRIPT_Q": shlex.quote(ACTIVATE),
    }
    proc = subprocess.run(
        [str(bin_dir / "pyinfra"), "inventory.py", "deploy.py", "-y", "--parallel", str(parallel)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pyinfra failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


PLAYBOOK = """\
- hosts: all
  gather_facts: false
  vars:
    base: "{{ root }}/srv/app"
    remote: "{{ base }}/.incoming/{{ version }}.tar.gz"
  tasks:
    - name: incoming
      ansible.builtin.file: {path: "{{ base }}/.incoming", state: directory}
    - name: upload
      ansible.builtin.copy: {src: "{{ tarball }}", dest: "{{ remote }}"}
    - name: activate
      ansible.builtin.command:
        argv: [sh, -c, "{{ script }}", activate, "{{ base }}", "{{ version }}", "{{ sha }}",
               "{{ remote }}"]
"""


def setup_ansible(work: Path, info: stack.StackInfo, forks: int) -> Path:
    inventory = {
        "all": {
            "hosts": {
                h.name: {
                    "ansible_host": "127.0.0.1",
                    "ansible_port": h.port,
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": info.key_file,
                    "root": h.root,
                }
                for h in info.hosts
            }
        }
    }
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (work / "playbook.yml").write_text(PLAYBOOK)
    (work / "ansible.cfg").write_text(
        textwrap.dedent(
            f"""\
            [defaults]
            forks = {forks}
            host_key_checking = True
            interpreter_python = /usr/bin/python3
            [ssh_connection]
            pipelining = True
            control_path_dir = {work / "cp"}
            ssh_args = -o ControlMaster=auto -o ControlPersist=60s \
-o UserKnownHostsFile={info.known_hosts} -o StrictHostKeyChecking=yes
            """
        )
    )
    return work


def stop_ansible_masters(work: Path) -> None:
    """Close the SSH control masters Ansible left running (ControlPersist), so their sessions
    on the hosts end with the bench."""
    for socket_path in (work / "cp").glob("*"):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "bench"],
            capture_output=True,
            timeout=10,
        )


def run_ansible(bin_dir: Path, work: Path, tarball: Path, version: str) -> None:
    extra = {"version": version, "sha": sha_of(tarball), "tarball": str(tarball)}
    extra["script"] = ACTIVATE
    proc = subprocess.run(
        [
            str(bin_dir / "ansible-playbook"),
            "-i",
            "inventory.yml",
            "playbook.yml",
            "-e",
            json.dumps(extra),
        ],
        cwd=work,
        env={**os.environ, "ANSIBLE_CONFIG": str(work / "ansible.cfg")},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ansible failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")


# -- checks and timing -----------------------------------------------------------------------


def verify(info: stack.StackInfo, version: str) -> None:
    """Every host's ``current`` is ``releases/<version>`` and it was restarted (read locally)."""
    for host in info.hosts:
        current = Path(host.root) / "srv" / "app" / "current"
        target = os.readlink(current)
        if target.rsplit("/", 1)[-1] != version or not (current / "restarted").exists():
            raise RuntimeError(f"{host.name}: current -> {target}, expected {version}")


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int, children: dict[int, list[int]], skip: set[int]) -> float:
    """CPU seconds of ``pid`` and every live descendant not in ``skip``, reaped children
    included (utime, stime, cutime, cstime of each live process of the tree)."""
    total, queue = 0.0, [pid]
    while queue:
        p = queue.pop()
        if p in skip and p != pid:
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / _TICK
        queue.extend(children.get(p, []))
    return total


class CpuMeter:
    """CPU seconds per process group (sshd daemons and everything they run, this process and
    its subprocesses, the Prefect server, PostgreSQL) and of the whole machine, from /proc."""

    def __init__(self, stack_root: Path) -> None:
        self.groups: dict[str, list[int]] = {"client": [os.getpid()]}
        found = {
            "sshd": sorted(stack_root.glob("hosts/*/run/sshd.pid")),
            "prefect": [stack_root / "prefect" / "server.pid"],
            "postgres": [stack_root / "postgres" / "postgres.pid"],
        }
        for group, files in found.items():
            pids = [int(f.read_text().split()[0]) for f in files if f.exists()]
            if pids:
                self.groups[group] = pids

    def snapshot(self) -> dict[str, float]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        roots = {p for pids in self.groups.values() for p in pids}
        out = {
            g: sum(_tree_cpu(p, children, roots) for p in pids) for g, pids in self.groups.items()
        }
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        out["machine"] = (sum(v) - v[3] - v[4]) / _TICK
        return out


METER: CpuMeter | None = None
CPU: dict[str, list[dict[str, float]]] = {}


def timed(label: str, fn: Callable[[], object]) -> float:
    before = METER.snapshot() if METER else {}
    started = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - started
    print(f"  {label:<34} {elapsed:7.2f} s", flush=True)
    if METER:
        after = METER.snapshot()
        used = {g: after[g] - before[g] for g in after}
        CPU.setdefault(label, []).append(used)
        parts = ", ".join(f"{g} {v:.1f}" for g, v in used.items())
        print(f"  {'    ... CPU s':<34} {parts}", flush=True)
    return elapsed


def rollback_seconds(root: Path, version: str) -> float:
    """Seconds of the compensation recorded in the last ``deploy.rolled_back`` audit event."""
    from kmpops.records import Records

    recs = Records(f"sqlite:///{root / 'records.db'}")
    try:
        events = recs.audit_events(action="deploy.rolled_back")
    finally:
        recs.close()
    details = events[-1].details
    if len(details["hosts"]) == 0 or details["rollback_failed"]:
        raise RuntimeError(f"rollback of {version} incomplete: {details}")
    return float(details["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--port-base", type=int, default=23000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ansible-runs", type=int, default=1, help="0: skip Ansible")
    parser.add_argument("--no-pyinfra", action="store_true")
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--batch", default="100%", help="production batch_size for kmp-ops")
    parser.add_argument(
        "--workers", type=int, default=0, help="floor thread pool size (0: one per host)"
    )
    parser.add_argument(
        "--locks-ab",
        action="store_true",
        help="also run (a) without target locks in every run, alternating which goes first",
    )
    parser.add_argument(
        "--ab-tree",
        type=Path,
        default=None,
        help="also run the pipeline of this other checkout and of this one, each in its own "
        "process, alternating which goes first (before/after of a change, same run)",
    )
    parser.add_argument("--root", type=Path, default=REPO / "var" / "bench-deploy")
    parser.add_argument("--venvs", type=Path, default=REPO / "var" / "bench-venvs")
    args = parser.parse_args(argv)
    if not 1 <= args.hosts <= stack.MAX_HOSTS:
        parser.error(f"--hosts must be between 1 and {stack.MAX_HOSTS}")
    args.workers = args.workers or args.hosts  # the fastest pool size measured (bench/README.md)

    root = args.root.resolve()
    if root.exists():
        stack.down(root)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    dist = root / "dist"
    dist.mkdir()
    size = int(args.size_mb * 1024 * 1024)
    pyinfra_bin = ansible_bin = None
    if not args.no_pyinfra:
        pyinfra_bin = venv(args.venvs, "pyinfra", ["pyinfra==3.*", "paramiko<5"])
    if args.ansible_runs:
        ansible_bin = venv(args.venvs, "ansible", ["ansible-core==2.19.*"])
    try:
        t0 = time.perf_counter()
        info = stack.up(
            stack.StackSpec(
                root=root / "stack",
                port_base=args.port_base,
                production_hosts=args.hosts,
                staging_hosts=0,
                prefect_db="postgres",
                components=("sshd", "postgres", "prefect"),
                deploy_user=None,  # every contender logs in as root: the same work
            )
        )
        print(
            f"stack up in {time.perf_counter() - t0:.1f} s: {args.hosts} sshd, PostgreSQL, "
            f"Prefect on PostgreSQL",
            flush=True,
        )
        global METER
        METER = CpuMeter(root / "stack")
        os.environ.update(
            {
                "PREFECT_API_URL": info.prefect["api_url"],
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(root / "prefect-client"),
                "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING",
                "KMPOPS_CONFIG": str(write_ops_yaml(info, root, args.batch)),
                "KMPOPS_ACTOR": "bench",
            }
        )
        versions = ["0.0.1"] + [f"1.{i}.{c}" for i in range(1, args.runs + 1) for c in range(6)]
        versions += [f"9.{i}.0" for i in range(1, args.ansible_runs + 1)]
        releases = {v: make_release(dist, v, size) for v in versions}
        bad = make_release(dist, "6.6.6", size, unhealthy=True)
        for v, path in [*releases.items(), ("6.6.6", bad)]:
            publish_evidence(root, v, sha_of(path))
        print(f"release tarball {releases['0.0.1'].stat().st_size / 1e6:.1f} MB", flush=True)
        timed(
            "baseline 0.0.1 (kmp-ops, first)",
            lambda: run_kmpops("0.0.1", releases["0.0.1"], first=True),
        )
        verify(info, "0.0.1")
        pyinfra_work = ansible_work = None
        if pyinfra_bin:
            (root / "pyinfra").mkdir()
            pyinfra_work = setup_pyinfra(root / "pyinfra", info)
        if ansible_bin:
            (root / "ansible").mkdir()
            ansible_work = setup_ansible(root / "ansible", info, args.hosts)

        kmp, kmp_done, floor, pyi, ans = [], [], [], [], []
        nolock, nolock_done = [], []
        ab: dict[str, list[tuple[float, float]]] = {"this": [], "other": []}
        for i in range(1, args.runs + 1):
            print(f"run {i}", flush=True)
            if args.ab_tree is not None:
                for side in ["other", "this"] if i % 2 else ["this", "other"]:
                    v = f"1.{i}.4" if side == "this" else f"1.{i}.5"
                    tree = REPO if side == "this" else args.ab_tree.resolve()
                    got = run_tree(tree, v, releases[v])
                    call, completed = float(got["call"]), float(got["completed"])
                    ab[side].append((call, completed))
                    stages = ", ".join(f"{k} {float(t):.2f}" for k, t in got["timings"].items())
                    print(
                        f"  (a/{side}) {tree.name:<27} {call:7.2f} s (Completed "
                        f"{completed:.2f}); {stages}",
                        flush=True,
                    )
                    verify(info, v)
            order = ["with", "without"] if i % 2 else ["without", "with"]
            for mode in order if args.locks_ab else ["with"]:
                v = f"1.{i}.0" if mode == "with" else f"1.{i}.3"
                done: list[float] = []
                with locks_disabled() if mode == "without" else contextlib.nullcontext():
                    took = timed(
                        "(a) kmp-ops deploy-pipeline" + (" NO LOCKS" if mode == "without" else ""),
                        lambda v=v, done=done: done.append(run_kmpops(v, releases[v])),
                    )
                (kmp if mode == "with" else nolock).append(took)
                (kmp_done if mode == "with" else nolock_done).append(done[0])
                print(f"  {'    ... Completed on the server at':<34} {done[0]:7.2f} s", flush=True)
                verify(info, v)
            v = f"1.{i}.1"
            floor.append(
                timed(
                    "(b) ThreadPool + paramiko",
                    lambda v=v: run_floor(info, releases[v], v, args.workers),
                )
            )
            verify(info, v)
            if pyinfra_bin and pyinfra_work:
                v = f"1.{i}.2"
                pyi.append(
                    timed(
                        "(c) pyinfra",
                        lambda v=v: run_pyinfra(
                            pyinfra_bin, pyinfra_work, releases[v], v, args.hosts
                        ),
                    )
                )
                verify(info, v)
        for i in range(1, args.ansible_runs + 1):
            assert ansible_bin and ansible_work
            v = f"9.{i}.0"
            ans.append(
                timed(
                    "(d) ansible-playbook",
                    lambda v=v: run_ansible(ansible_bin, ansible_work, releases[v], v),
                )
            )
            verify(info, v)

        last = (
            f"9.{args.ansible_runs}.0"
            if args.ansible_runs
            else (f"1.{args.runs}.2" if pyi else f"1.{args.runs}.1")
        )
        print("rollback", flush=True)

        def bad_deploy() -> None:
            try:
                run_kmpops("6.6.6", bad)
            except Exception as exc:  # expected: the health check fails everywhere
                print(f"  (expected failure: {str(exc)[:120]}...)")
            else:
                raise RuntimeError("the unhealthy release was not refused")

        timed("bad release + rollback (total)", bad_deploy)
        verify(info, last)
        rb = rollback_seconds(root, "6.6.6")

        a, b = statistics.median(kmp), statistics.median(floor)
        print(f"\nhosts={args.hosts} tarball={args.size_mb:g} MiB runs={args.runs} (median)")
        a_done = statistics.median(kmp_done)
        print(f"(a) kmp-ops deploy-pipeline  {a:7.2f} s (call returned)")
        print(f"    ... run Completed        {a_done:7.2f} s (final state on the server)")
        if nolock:
            n, n_done = statistics.median(nolock), statistics.median(nolock_done)
            print(f"(a') without target locks    {n:7.2f} s (call returned)")
            print(f"    ... run Completed        {n_done:7.2f} s")
            print(
                f"locks cost                   {100 * (a / n - 1):+6.1f} % "
                f"(run Completed: {100 * (a_done / n_done - 1):+.1f} %); "
                f"with {[round(x, 2) for x in kmp]}, without {[round(x, 2) for x in nolock]}"
            )
        if ab["this"]:
            this, this_done = (statistics.median(x) for x in zip(*ab["this"], strict=True))
            other, other_done = (statistics.median(x) for x in zip(*ab["other"], strict=True))
            name = args.ab_tree.name if args.ab_tree else "other"
            print(f"(a/this)  this checkout      {this:7.2f} s (Completed {this_done:.2f})")
            print(f"(a/other) {name:<18} {other:7.2f} s (Completed {other_done:.2f})")
            print(
                f"this / other                 {this / other:7.3f}x  (Completed: "
                f"{this_done / other_done:.3f}x); this {[round(c, 2) for c, _ in ab['this']]}, "
                f"other {[round(c, 2) for c, _ in ab['other']]}"
            )
        print(f"(b) paramiko thread pool     {b:7.2f} s")
        if pyi:
            print(f"(c) pyinfra                  {statistics.median(pyi):7.2f} s")
        if ans:
            print(
                f"(d) ansible-playbook         {statistics.median(ans):7.2f} s ({len(ans)} run(s))"
            )
        print(
            f"rollback of {args.hosts} hosts      {rb:7.2f} s (compensation stage, from the audit)"
        )
        print(f"ratio kmp-ops / floor        {a / b:7.2f}x  (run Completed: {a_done / b:.2f}x)")
        if pyi:
            c = statistics.median(pyi)
            print(f"ratio kmp-ops / pyinfra      {a / c:7.2f}x  (run Completed: {a_done / c:.2f}x)")
        if ans:
            d = statistics.median(ans)
            print(f"ratio ansible / kmp-ops      {d / a:7.2f}x  (run Completed: {d / a_done:.2f}x)")
    finally:
        if "prefect" in sys.modules:  # send queued logs and events before the server stops
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogHandler

            with contextlib.suppress(Exception):
                APILogHandler().flush()
                EventsWorker.drain_all()
        stop_ansible_masters(root / "ansible")
        stack.down(root / "stack")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
