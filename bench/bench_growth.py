"""Benchmark: how a deploy grows with the fleet — kmp-ops, the paramiko floor and pyinfra at
50, 100, 250 and 500 hosts from one control node, in one run.

    .venv/bin/python bench/bench_growth.py --hosts 50,100,250,500 --runs 3

One local stack of the largest size (``max(--hosts)`` sshd daemons, PostgreSQL, a Prefect
server on PostgreSQL; every contender logs in as root, so the work is the same), then at each
size, alternating the contenders' order run by run, on the first N hosts:

(a) kmp-ops: the ``deploy-pipeline`` flow (checklist, plan, one batch of 100 %, smoke checks,
    bake 0, release records, audit chain) in a fresh process per run (its peak RSS is that
    run's: ``ru_maxrss``), orchestrated by the stack's Prefect server;
(b) the floor: one paramiko connection per host on a thread per host (``bench_deploy``'s);
(c) pyinfra ``--parallel N`` (``files.put`` + ``server.shell``), in its own virtualenv.

The work is ``bench_deploy``'s: upload a ``--size-mb`` release tarball, verify its sha256,
extract, switch ``current``, restart, health check, keep 3; every run is checked afterwards on
every host's ``current``. Around each kmp-ops run the CPU seconds of the Prefect server and of
PostgreSQL (process trees, from /proc) are read and given as a share of the whole machine's.

It prints a table (medians), writes ``--out``/growth.json and draws ``--out``/growth.png (time
vs hosts, one line per contender; matplotlib in a virtualenv of its own under ``--venvs``).
Numbers and what they mean: bench/README.md, "growth".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import bench_deploy as bd  # noqa: E402

from kmpops import stack  # noqa: E402

# One kmp-ops deploy in a process of its own: a dry run first (imports, the Prefect client:
# what every run of a deployment pays once), then the timed deploy; one JSON line back.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from datetime import UTC, datetime
from prefect.client.orchestration import get_client
from flows.deploy_pipeline import DeployRequest, deploy_pipeline
def request(**kw):
    return DeployRequest(service="app", environment="production", artifact={tarball!r},
                         bake_seconds=0, requested_by="bench", **kw)
first = {first!r}
if not first:
    deploy_pipeline(request(version={version!r}, dry_run=True))
print("READY", flush=True)
sys.stdin.readline()  # the parent reads the CPU counters, then says go
started = datetime.now(UTC); t0 = time.perf_counter()
state = deploy_pipeline(request(version={version!r}, allow_first_install=first),
                        return_state=True)
call = time.perf_counter() - t0
result = state.result()
with get_client(sync_client=True) as client:
    run = client.read_flow_run(state.state_details.flow_run_id)
print("GROWTH " + json.dumps({{
    "call": call, "completed": (run.end_time - started).total_seconds(),
    "timings": result["timings"],
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}), flush=True)
"""

PLOT = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
sizes = [row["hosts"] for row in data["rows"]]
fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
for key, label in (("kmpops", "kmp-ops deploy-pipeline"), ("floor", "paramiko thread pool"),
                   ("pyinfra", "pyinfra")):
    ys = [row.get(key) for row in data["rows"]]
    if any(y is not None for y in ys):
        ax.plot(sizes, ys, marker="o", label=label)
ax.set_xlabel("hosts"); ax.set_ylabel("seconds (median)")
ax.set_title(data["title"], fontsize=9)
ax.grid(True, alpha=0.3); ax.legend()
fig.tight_layout(); fig.savefig(sys.argv[2])
"""


def ops_yaml_for(info: stack.StackInfo, root: Path, hosts: int) -> Path:
    """The bench's ops.yaml (``bench_deploy.write_ops_yaml``) with the first ``hosts`` hosts."""
    path = bd.write_ops_yaml(info, root, "100%")
    cfg = yaml.safe_load(path.read_text())
    production = cfg["environments"]["production"]
    production["hosts"] = production["hosts"][:hosts]
    out = root / f"ops-{hosts}.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def run_kmpops(config: Path, version: str, tarball: Path, *, first: bool = False) -> dict:
    """One deploy by kmp-ops in a fresh process; its call time, Completed time, stage timings,
    peak RSS and (``cpu``) the CPU seconds per process group during the timed deploy only
    (the child's imports and dry run are outside the window). Raises with the child's stderr
    if it failed."""
    code = CHILD.format(repo=str(REPO), tarball=str(tarball), version=version, first=first)
    err = Path(os.environ["PREFECT_HOME"]).parent / "child.stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "KMPOPS_CONFIG": str(config)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        before: dict[str, float] = {}
        got: dict[str, Any] | None = None
        for line in proc.stdout:
            if line.startswith("READY"):
                before = bd.METER.snapshot() if bd.METER else {}
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif line.startswith("GROWTH "):
                after = bd.METER.snapshot() if bd.METER else {}
                got = json.loads(line[len("GROWTH ") :])
                got["cpu"] = {g: after[g] - before.get(g, 0.0) for g in after}
        status = proc.wait(timeout=1800)
    if status != 0 or got is None:
        raise RuntimeError(f"kmp-ops {version}: exit {status}: {err.read_text()[-3000:]}")
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="50,100,250,500", help="comma-separated sizes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--port-base", type=int, default=19000)
    parser.add_argument("--no-pyinfra", action="store_true")
    parser.add_argument("--root", type=Path, default=REPO / "var" / "bench-growth")
    parser.add_argument("--venvs", type=Path, default=REPO / "var" / "bench-venvs")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(x) for x in args.hosts.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--hosts must be comma-separated numbers, not {args.hosts!r}")
    if not sizes or sizes[0] < 1 or sizes[-1] > stack.MAX_HOSTS:
        parser.error(f"--hosts sizes must be between 1 and {stack.MAX_HOSTS}")

    root = args.root.resolve()
    if root.exists():
        stack.down(root / "stack")
        shutil.rmtree(root)
    (root / "dist").mkdir(parents=True)
    size = int(args.size_mb * 1024 * 1024)
    pyinfra_bin = (
        None if args.no_pyinfra else bd.venv(args.venvs, "pyinfra", ["pyinfra==3.*", "paramiko<5"])
    )
    plot_bin = bd.venv(args.venvs, "plot", ["matplotlib"])
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        info = stack.up(
            stack.StackSpec(
                root=root / "stack",
                port_base=args.port_base,
                production_hosts=sizes[-1],
                staging_hosts=0,
                prefect_db="postgres",
                components=("sshd", "postgres", "prefect"),
                deploy_user=None,  # every contender logs in as root: the same work
            )
        )
        stack_up_s = time.perf_counter() - t0
        print(f"stack up in {stack_up_s:.1f} s: {sizes[-1]} sshd, PostgreSQL, Prefect", flush=True)
        bd.METER = bd.CpuMeter(root / "stack")
        os.environ.update(
            {
                "PREFECT_API_URL": info.prefect["api_url"],
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(root / "prefect-client"),
                "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING",
                "KMPOPS_ACTOR": "bench",
            }
        )

        def release(version: str) -> Path:
            path = bd.make_release(root / "dist", version, size)
            bd.publish_evidence(root, version, bd.sha_of(path))
            return path

        base = release("0.0.1")
        got = run_kmpops(ops_yaml_for(info, root, sizes[-1]), "0.0.1", base, first=True)
        bd.verify(info, "0.0.1")
        print(f"baseline 0.0.1 on {sizes[-1]} hosts: {got['call']:.2f} s", flush=True)
        for n in sizes:
            sub = dataclasses.replace(info, hosts=info.hosts[:n])
            config = ops_yaml_for(info, root, n)
            work = root / f"pyinfra-{n}"
            if pyinfra_bin:
                work.mkdir()
                bd.setup_pyinfra(work, sub)
            kmp: list[dict[str, Any]] = []
            cpu: list[dict[str, float]] = []
            floor: list[float] = []
            pyi: list[float] = []
            print(f"{n} hosts", flush=True)
            for i in range(1, args.runs + 1):
                order = ["kmpops", "floor", "pyinfra"]
                order = order[i % 3 :] + order[: i % 3]
                for who in order:
                    v = f"{n}.{i}.{order.index(who)}"
                    tarball = release(v)
                    if who == "kmpops":
                        started = time.perf_counter()
                        got = run_kmpops(config, v, tarball)
                        wall = time.perf_counter() - started
                        kmp.append(got)
                        cpu.append(got["cpu"])
                        stages = ", ".join(f"{k} {t:.2f}" for k, t in got["timings"].items())
                        print(
                            f"  (a) kmp-ops {got['call']:7.2f} s (Completed "
                            f"{got['completed']:.2f}; process {wall:.1f} s, RSS "
                            f"{got['rss_mb']:.0f} MB); {stages}",
                            flush=True,
                        )
                    elif who == "floor":
                        floor.append(
                            bd.timed(
                                "(b) ThreadPool + paramiko",
                                lambda v=v, t=tarball, s=sub, n=n: bd.run_floor(s, t, v, n),
                            )
                        )
                    elif pyinfra_bin:
                        pyi.append(
                            bd.timed(
                                "(c) pyinfra",
                                lambda v=v, t=tarball, w=work, n=n: bd.run_pyinfra(
                                    pyinfra_bin, w, t, v, n
                                ),
                            )
                        )
                    else:
                        continue
                    bd.verify(sub, v)
                    for old in (root / "dist").glob(f"app-{v}.tar.gz*"):  # keep the disk bounded
                        old.unlink()
            machine = sum(c["machine"] for c in cpu)
            row = {
                "hosts": n,
                "kmpops": statistics.median(k["call"] for k in kmp),
                "kmpops_completed": statistics.median(k["completed"] for k in kmp),
                "floor": statistics.median(floor),
                "pyinfra": statistics.median(pyi) if pyi else None,
                "rss_mb": max(k["rss_mb"] for k in kmp),
                "prefect_cpu_share": sum(c.get("prefect", 0) for c in cpu) / machine,
                "postgres_cpu_share": sum(c.get("postgres", 0) for c in cpu) / machine,
                "client_cpu_share": sum(c.get("client", 0) for c in cpu) / machine,
                "sshd_cpu_share": sum(c.get("sshd", 0) for c in cpu) / machine,
                "stages": {
                    k: statistics.median(r["timings"][k] for r in kmp) for k in kmp[0]["timings"]
                },
                "samples": {"kmpops": [k["call"] for k in kmp], "floor": floor, "pyinfra": pyi},
            }
            rows.append(row)
    finally:
        with contextlib.suppress(Exception):
            stack.down(root / "stack")

    first = rows[0]
    print(
        f"\n{'hosts':>5} {'kmp-ops':>8} {'Complet.':>8} {'floor':>7} {'pyinfra':>8} "
        f"{'/floor':>7} {'/pyinfra':>8} {'/first':>7} {'RSS MB':>7} {'MB/host':>8} "
        f"{'Prefect':>8} {'PG':>6} {'client':>7} {'sshd':>6}"
    )
    for row in rows:
        n = row["hosts"]
        marginal = (
            (row["rss_mb"] - first["rss_mb"]) / (n - first["hosts"]) if n > first["hosts"] else 0
        )
        row["rss_mb_per_host"] = marginal
        pyinfra = row["pyinfra"]
        print(
            f"{n:>5} {row['kmpops']:>8.2f} {row['kmpops_completed']:>8.2f} {row['floor']:>7.2f} "
            f"{pyinfra if pyinfra is not None else float('nan'):>8.2f} "
            f"{row['kmpops'] / row['floor']:>6.2f}x "
            f"{(row['kmpops'] / pyinfra) if pyinfra else float('nan'):>7.2f}x "
            f"{row['kmpops'] / first['kmpops']:>6.2f}x {row['rss_mb']:>7.0f} {marginal:>8.2f} "
            f"{100 * row['prefect_cpu_share']:>7.1f}% {100 * row['postgres_cpu_share']:>5.1f}% "
            f"{100 * row['client_cpu_share']:>6.1f}% {100 * row['sshd_cpu_share']:>5.1f}%"
        )
    for row in rows:
        stages = ", ".join(f"{k} {t:.2f}" for k, t in row["stages"].items())
        print(f"  {row['hosts']:>4} hosts, kmp-ops stages (median s): {stages}")
    print(
        "(/first: time at N over time at the smallest size; MB/host: peak RSS growth per host "
        "over the smallest size; CPU shares: of the whole machine during the kmp-ops runs)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    data = {
        "title": f"deploy of a {args.size_mb:g} MiB release, median of {args.runs} "
        f"(2 cores, load {load[0]:.1f}), {time.strftime('%Y-%m-%d')}",
        "stack_up_s": stack_up_s,
        "rows": rows,
    }
    (args.out / "growth.json").write_text(json.dumps(data, indent=2) + "\n")
    subprocess.run(
        [
            str(plot_bin / "python"),
            "-c",
            PLOT,
            str(args.out / "growth.json"),
            str(args.out / "growth.png"),
        ],
        check=True,
        timeout=300,
    )
    print(f"wrote {args.out / 'growth.json'} and {args.out / 'growth.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
