"""`kmpops stack up|status|down` on a small stack of its own: everything stops by pid file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmpops.config import load_config
from kmpops.stack import postgres
from kmpops.stack._proc import pid_alive, port_open
from kmpops.stack.deploy_user import remove_placed_hosts

PORT_BASE = 28000


def _pid_files(root: Path) -> list[Path]:
    """Every pid file under ``root``, symlinks followed: a root the deploy user cannot enter
    (pytest's mode-700 tmp) keeps its host roots under /var/lib/kmpops behind ``root/hosts``."""
    found: dict[str, Path] = {}
    for current, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if name.endswith(".pid"):
                path = Path(current, name)
                found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def _kmpops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmpops.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_stack_up_status_down(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    common = ["--root", str(root)]
    up = _kmpops(
        "stack", "up", *common, "--port-base", str(PORT_BASE), "--hosts", "2",
        "--staging-hosts", "1", "--without", "s3", "--without", "postgres",
        "--without", "prefect", "--without", "prometheus",
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert "3 hosts" in up.stdout
        cfg = load_config(root / "ops.yaml")
        assert [h.name for h in cfg.environment("production").hosts] == ["prd-1", "prd-2"]
        assert cfg.storage is not None and cfg.storage.backend == "local"
        # the audit key: generated outside the records, 0600; checkpoints in a local file
        audit_key = root / "secrets" / "audit_key"
        assert str(cfg.records.audit_key) == f"file:{audit_key.resolve()}"
        assert audit_key.stat().st_mode & 0o777 == 0o600
        assert cfg.records.checkpoints is not None
        assert cfg.records.checkpoints.backend == "local"
        key_before = audit_key.read_text()
        status = _kmpops("stack", "status", *common)
        assert status.returncode == 0
        assert status.stdout.count("up  ") == 3
        pids = [int(p.read_text()) for p in _pid_files(root)]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        again = _kmpops("stack", "up", *common, "--port-base", str(PORT_BASE), "--hosts", "2",
                        "--staging-hosts", "1", "--without", "s3", "--without", "postgres",
                        "--without", "prefect", "--without", "prometheus")  # fmt: skip
        assert again.returncode == 0, again.stderr  # idempotent
        assert audit_key.read_text() == key_before  # events tagged with it stay verifiable
        assert sorted(int(p.read_text()) for p in _pid_files(root)) == sorted(pids)
    finally:
        down = _kmpops("stack", "down", *common)
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids)
    assert list(_pid_files(root)) == []
    remove_placed_hosts(root)


def test_unknown_component_is_refused(tmp_path: Path) -> None:
    res = _kmpops("stack", "up", "--root", str(tmp_path), "--without", "kafka")
    assert res.returncode == 1
    assert "unknown stack components: kafka" in res.stderr


# -- a failed start cleans up after itself (issue 8) -------------------------------------------
# Ports 29001-29302: a mini stack of its own, away from the session stack and the test above.
MINI_BASE = 29000

HOLDER = r"""
import socket, sys, time
port, wait_for = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 60
while wait_for and time.monotonic() < deadline:  # bind only once the stack has started sshd
    try:
        socket.create_connection(("127.0.0.1", wait_for), timeout=0.2).close()
        break
    except OSError:
        time.sleep(0.02)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen()
print("bound", flush=True)
time.sleep(120)
"""


def _holder(port: int, wait_for: int = 0) -> subprocess.Popen[str]:
    """A process that is not part of the stack and listens on ``port``."""
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(port), str(wait_for)], stdout=subprocess.PIPE, text=True
    )


def _live_pids(root: Path) -> list[int]:
    """Live pids of the stack's pid files (:func:`_pid_files`)."""
    return [int(p.read_text()) for p in _pid_files(root) if pid_alive(int(p.read_text()))]


def test_a_busy_port_is_refused_naming_its_holder_and_nothing_starts(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    holder = _holder(MINI_BASE + 200)  # PostgreSQL's port
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        up = _kmpops(
            "stack", "up", "--root", str(root), "--port-base", str(MINI_BASE), "--hosts", "1",
            "--staging-hosts", "1", "--without", "s3", "--without", "prefect",
            "--without", "prometheus",
        )  # fmt: skip
        assert up.returncode == 1
        assert f"port {MINI_BASE + 200} (PostgreSQL) is held by pid {holder.pid}" in up.stderr
        assert "make stack-down" in up.stderr and "--port-base" in up.stderr
        assert _live_pids(root) == []  # not even the sshd hosts were started
    finally:
        holder.kill()
        holder.wait()


def test_a_start_that_fails_part_way_stops_everything_it_started(tmp_path: Path) -> None:
    """sshd and PostgreSQL start; then Prometheus' port is found taken: both are stopped again."""
    from kmpops import stack

    root = tmp_path / "stack"
    holder = _holder(MINI_BASE + 300, wait_for=MINI_BASE + 1)  # binds once sshd stg-1 listens
    spec = stack.StackSpec(
        root=root,
        port_base=MINI_BASE,
        production_hosts=1,
        staging_hosts=1,
        components=("sshd", "postgres", "prometheus"),
    )
    try:
        with pytest.raises(stack.StackError) as err:
            stack.up(spec)
        assert f"port {MINI_BASE + 300} (Prometheus) is held by pid {holder.pid}" in str(err.value)
        from kmpops.stack.postgres import _layout

        assert (_layout(root)["data"] / "PG_VERSION").exists()  # PostgreSQL did start ...
        assert (root / "hosts" / "stg-1").is_dir()  # ... and so did the sshd hosts ...
        assert _live_pids(root) == []  # ... and nothing of them is left running
        assert not any(port_open(p) for p in (MINI_BASE + 1, MINI_BASE + 2, MINI_BASE + 200))
    finally:
        holder.kill()
        holder.wait()
        stack.down(root)
        postgres.remove(root)
        remove_placed_hosts(root)


def test_postgres_starts_under_a_mode_700_directory(tmp_path: Path) -> None:
    """root's home is mode 700: the cluster lives where the postgres user can reach it, and the
    user's directory keeps its mode."""
    import os

    import psycopg

    from kmpops import stack

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    root = home / "clone" / "var" / "stack"
    spec = stack.StackSpec(
        root=root, port_base=MINI_BASE, production_hosts=1, staging_hosts=0,
        components=("postgres",),
    )  # fmt: skip
    try:
        info = stack.up(spec)
        assert info.postgres is not None
        with psycopg.connect(
            f"host=127.0.0.1 port={MINI_BASE + 200} user=postgres dbname=app"
        ) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        cluster = Path((root / "postgres" / "cluster-dir").read_text().strip())
        assert (cluster / "data" / "PG_VERSION").exists()
        assert os.stat(home).st_mode & 0o777 == 0o700
    finally:
        stack.down(root)
    assert _live_pids(root) == []
    postgres.remove(root)
    assert not cluster.exists()
