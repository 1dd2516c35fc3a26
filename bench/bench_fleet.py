"""Benchmark: one release step on N real sshd hosts, kmp-ops Fleet vs plain paramiko.

The step on every host: upload a 5 MB tarball, extract it into
``<host root>/srv/web/releases/<version>``, switch ``current`` atomically (``ln -sfn`` to a temp
name + ``mv -T``), run the health check (``current/control health``), prune to two releases.

    .venv/bin/python bench/bench_fleet.py --hosts 50

(a) kmp-ops ``Fleet`` + ``SSHConnection``; (b) the floor: ``ThreadPoolExecutor`` + one paramiko
``SSHClient`` per host doing the same commands; (c) serial paramiko (one run). (a) and (b)
alternate, median of ``--runs``; every run connects afresh. See bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmpops.connectors.ssh import Fleet, SSHConnection
from kmpops.shellsafe import render_command, validate_name
from kmpops.stack.sshd import SSHHostInfo, start_fleet, stop_fleet

CONTROL = b"""#!/bin/sh
# The sample service's control script: `control health` exits 0 when the release is whole.
here=$(cd "$(dirname "$0")" && pwd)
case "$1" in
  health) test -f "$here/VERSION" && test -s "$here/payload.bin" && echo healthy ;;
  *) echo "usage: control health" >&2; exit 2 ;;
esac
"""

# Extract (from a file or from stdin), switch `current` atomically, health check, keep 2.
ACTIVATE = (
    "set -eu; base={base}; v={version}; src={source}; "
    'mkdir -p "$base/releases"; cd "$base"; '
    'rm -rf "releases/$v.partial"; mkdir "releases/$v.partial"; '
    'if [ "$src" = - ]; then tar -xf - -C "releases/$v.partial"; '
    'else tar -xf "$src" -C "releases/$v.partial"; rm -f "$src"; fi; '
    'rm -rf "releases/$v"; mv "releases/$v.partial" "releases/$v"; '
    'ln -sfn "releases/$v" current.tmp; mv -T current.tmp current; '
    "current/control health; "
    'for old in $(ls -1t releases | tail -n +3); do rm -rf "releases/$old"; done'
)


def make_tarball(directory: Path, size: int) -> Path:
    """A tarball of an incompressible payload, a control script and VERSION."""
    path = directory / "release.tar"
    with tarfile.open(path, "w") as tar:
        for name, data, mode in [
            ("payload.bin", os.urandom(size), 0o644),
            ("control", CONTROL, 0o755),
            ("VERSION", b"bench\n", 0o644),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return path


def activate_command(host: SSHHostInfo, version: str, source: str) -> str:
    validate_name(version, what="version")
    return render_command(
        ACTIVATE, {"base": f"{host.root}/srv/web", "version": version, "source": source}
    )


# -- (a) kmp-ops ----------------------------------------------------------------------------


def kmpops_release_step(
    host: SSHHostInfo, tarball: Path, data: bytes, version: str, upload: str
) -> Callable[[SSHConnection], str]:
    """The release step for one host, as a Fleet step."""

    def step(conn: SSHConnection) -> str:
        if upload == "stdin":
            command = activate_command(host, version, "-")
            return conn.run(command, stdin=data, check=True, timeout=120).stdout
        remote = f"{host.root}/tmp/{version}.tar"
        conn.put(tarball, remote)
        return conn.run(activate_command(host, version, remote), check=True, timeout=120).stdout

    return step


def run_kmpops(
    hosts: list[SSHHostInfo], tarball: Path, version: str, workers: int, upload: str
) -> None:
    data = tarball.read_bytes()
    by_name = {h.name: h for h in hosts}
    with Fleet(hosts, max_workers=workers) as fleet:
        outcomes = fleet.run(
            lambda conn: kmpops_release_step(by_name[conn.name], tarball, data, version, upload)(
                conn
            )
        )
    failed = {name: o.error for name, o in outcomes.items() if not o.ok}
    if failed:
        raise RuntimeError(f"kmp-ops: {len(failed)} hosts failed: {failed}")


# -- (b)/(c) plain paramiko -----------------------------------------------------------------


FLOOR_OPTIONS: dict[str, object] = {}


def paramiko_release(
    host: SSHHostInfo, tarball: Path, data: bytes, version: str, upload: str
) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(host.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        host.address,
        port=host.port,
        username=host.user,
        key_filename=str(host.key_file),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
        **FLOOR_OPTIONS,
    )
    try:
        if upload == "stdin":
            command = activate_command(host, version, "-")
        else:
            remote = f"{host.root}/tmp/{version}.tar"
            sftp = client.open_sftp()
            sftp.put(str(tarball), remote, confirm=False)
            sftp.close()
            command = activate_command(host, version, remote)
        stdin, stdout, stderr = client.exec_command(command, timeout=120)
        if upload == "stdin":
            stdin.write(data)
        stdin.channel.shutdown_write()
        out = stdout.read()
        err = stderr.read()
        status = stdout.channel.recv_exit_status()
        if status != 0 or b"healthy" not in out:
            raise RuntimeError(f"{host.name}: exit {status}: {err[-300:]!r}")
    finally:
        client.close()


def run_floor(
    hosts: list[SSHHostInfo], tarball: Path, version: str, workers: int, upload: str
) -> None:
    data = tarball.read_bytes()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(paramiko_release, h, tarball, data, version, upload) for h in hosts]
        for future in futures:
            future.result()


def run_serial(hosts: list[SSHHostInfo], tarball: Path, version: str, upload: str) -> None:
    data = tarball.read_bytes()
    for host in hosts:
        paramiko_release(host, tarball, data, version, upload)


def verify(hosts: list[SSHHostInfo], version: str) -> None:
    """Every host's ``current`` points at ``releases/<version>`` (read locally: same machine)."""
    for host in hosts:
        target = os.readlink(host.root / "srv" / "web" / "current")
        if target != f"releases/{version}":
            raise RuntimeError(f"{host.name}: current -> {target}, expected {version}")


def timed(label: str, fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - started
    print(f"  {label:<28} {elapsed:7.2f} s", flush=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--port-base", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16, help="Fleet max_workers")
    parser.add_argument("--floor-workers", type=int, default=None, help="default: --workers")
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--upload", choices=["sftp", "stdin"], default="stdin")
    parser.add_argument("--no-serial", action="store_true")
    parser.add_argument(
        "--floor-gcm",
        action="store_true",
        help="let the floor use AES-GCM too (kmp-ops prefers it; paramiko's default is CTR)",
    )
    parser.add_argument("--root", type=Path, default=None, help="fleet dir (default: a temp dir)")
    args = parser.parse_args(argv)
    floor_workers = args.floor_workers or args.workers
    if args.floor_gcm:
        non_aead = [c for c in paramiko.Transport._preferred_ciphers if "gcm" not in c]
        FLOOR_OPTIONS["disabled_algorithms"] = {"ciphers": non_aead}

    with tempfile.TemporaryDirectory(prefix="kmpops-bench-") as tmp:
        root = args.root or Path(tmp) / "fleet"
        tarball = make_tarball(Path(tmp), int(args.size_mb * 1024 * 1024))
        names = [f"bench-{i:03d}" for i in range(1, args.hosts + 1)]
        ports = [args.port_base + i for i in range(1, args.hosts + 1)]
        try:
            started = time.perf_counter()
            hosts = start_fleet(root, names, ports)
            print(
                f"started {len(hosts)} sshd in {time.perf_counter() - started:.2f} s; "
                f"tarball {tarball.stat().st_size / 1e6:.1f} MB; upload={args.upload}; "
                f"workers kmp-ops={args.workers} floor={floor_workers}"
                f"{' floor-gcm' if args.floor_gcm else ''}",
                flush=True,
            )
            kmp, floor = [], []
            for i in range(1, args.runs + 1):
                print(f"run {i}", flush=True)
                version = f"r{i}-kmpops"
                kmp.append(
                    timed(
                        "(a) kmp-ops Fleet",
                        lambda v=version: run_kmpops(hosts, tarball, v, args.workers, args.upload),
                    )
                )
                verify(hosts, version)
                version = f"r{i}-floor"
                floor.append(
                    timed(
                        "(b) ThreadPool + paramiko",
                        lambda v=version: run_floor(hosts, tarball, v, floor_workers, args.upload),
                    )
                )
                verify(hosts, version)
            serial = None
            if not args.no_serial:
                print("serial", flush=True)
                serial = timed(
                    "(c) serial paramiko",
                    lambda: run_serial(hosts, tarball, "r-serial", args.upload),
                )
                verify(hosts, "r-serial")
            a, b = statistics.median(kmp), statistics.median(floor)
            print(f"\nhosts={len(hosts)} runs={args.runs} (median)")
            print(f"(a) kmp-ops Fleet         {a:7.2f} s")
            print(f"(b) floor (paramiko pool) {b:7.2f} s")
            if serial is not None:
                print(f"(c) serial paramiko       {serial:7.2f} s (1 run)")
            print(f"ratio kmp-ops / floor     {a / b:7.2f}x")
        finally:
            stop_fleet(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
