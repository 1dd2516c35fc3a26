"""kmpops.release and the SSH stdin stream on real OpenSSH daemons: what a host holds afterwards."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import pytest

from kmpops import release as rel
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import ConnectorError, HostUnreachable, IntegrityError, NotFound
from kmpops.stack.sshd import SSHHostInfo, crash_host, start_fleet, start_host, stop_fleet

PORT_BASE = 21200


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> list[SSHHostInfo]:
    root = tmp_path_factory.mktemp("release-fleet")
    try:
        yield start_fleet(root, ["rel-1", "rel-2"], [PORT_BASE + 1, PORT_BASE + 2])
    finally:
        stop_fleet(root)


@pytest.fixture
def conn(hosts):
    with SSHConnection.from_host(hosts[0]) as connection:
        yield connection


def tarball(tmp_path: Path, version: str, *, restart: str = "exit 0") -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data, mode in [
            ("payload.bin", os.urandom(2 * 1024 * 1024), 0o644),
            ("VERSION", f"{version}\n".encode(), 0o644),
            ("control", f"#!/bin/sh\n{restart}\n".encode(), 0o755),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"{version}.tar.gz"
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    return path


class FailingReader(io.RawIOBase):
    """A file that yields ``good`` bytes and then fails, like a disk read error."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("read error")
        n = min(size if size > 0 else self.left, self.left)
        self.left -= n
        return b"x" * n


def test_stdin_streams_a_file_without_reading_it_whole(conn, tmp_path):
    data = os.urandom(6 * 1024 * 1024 + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with path.open("rb") as source:
        result = conn.run("sha256sum", stdin=source, check=True)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_read_error_raises_and_stages_nothing(conn, hosts):
    base = f"{hosts[0].root}/srv/short"
    with pytest.raises(ConnectorError, match=r"reading the input .* failed: read error"):
        rel.stage_release(conn, base, "1.0.0", FailingReader(1 << 16), "a" * 64)
    time.sleep(0.3)  # the remote script ran to its checksum test
    assert not (Path(base) / "releases" / "1.0.0").exists()
    assert conn.run("echo still-usable", check=True).stdout.strip() == "still-usable"


def test_stage_switch_restart_and_prune(conn, hosts, tmp_path):
    base = f"{hosts[0].root}/srv/app"
    first, second = tarball(tmp_path, "1.0.0"), tarball(tmp_path, "2.0.0")
    assert rel.stage_release(conn, base, "1.0.0", first, rel.file_sha256(first)) is True
    assert rel.stage_release(conn, base, "1.0.0", first, rel.file_sha256(first)) is False
    marker = f"{base}/restarted"
    assert rel.switch_current(conn, base, "1.0.0", restart=f"pwd > {marker}-1") is None
    assert rel.stage_release(conn, base, "2.0.0", second, rel.file_sha256(second)) is True
    assert rel.switch_current(conn, base, "2.0.0", restart=f"pwd > {marker}-2") == "1.0.0"
    local = Path(base)
    assert os.readlink(local / "current") == "releases/2.0.0"
    assert (local / "current" / "VERSION").read_text() == "2.0.0\n"
    # The restart ran after the switch, in the directory a separate command would run in.
    assert (local / "restarted-2").read_text() == conn.run("pwd", check=True).stdout
    assert list((local / ".incoming").iterdir()) == []  # uploads never linger

    # A stale leftover of an interrupted upload is cleared; the current and previous stay.
    stale = local / ".incoming" / "9.9.9.abc.tar.gz"
    stale.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    for v in ("3.0.0", "4.0.0"):
        t = tarball(tmp_path, v)
        rel.stage_release(conn, base, v, t, rel.file_sha256(t))
        time.sleep(0.01)
    removed = rel.prune_releases(conn, base, keep=2, protect=["1.0.0"])
    assert removed == []  # 4.0.0, 3.0.0 newest; 2.0.0 current; 1.0.0 protected
    assert not stale.exists()
    removed = rel.prune_releases(conn, base, keep=2, protect=[])
    assert removed == ["1.0.0"]
    assert sorted(os.listdir(local / "releases")) == ["2.0.0", "3.0.0", "4.0.0"]


def test_checksum_mismatch_stages_nothing(conn, hosts, tmp_path):
    base = f"{hosts[0].root}/srv/bad"
    t = tarball(tmp_path, "1.0.0")
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        rel.stage_release(conn, base, "1.0.0", t, "0" * 64)
    assert not (Path(base) / "releases" / "1.0.0").exists()
    assert list((Path(base) / ".incoming").iterdir()) == []
    with pytest.raises(NotFound, match="not staged"):
        rel.switch_current(conn, base, "1.0.0")
    assert not (Path(base) / "current").exists()


def test_failed_restart_is_reported_after_the_switch(conn, hosts, tmp_path):
    base = f"{hosts[0].root}/srv/restart"
    for v in ("1.0.0", "2.0.0"):
        t = tarball(tmp_path, v)
        rel.stage_release(conn, base, v, t, rel.file_sha256(t))
    rel.switch_current(conn, base, "1.0.0")
    with pytest.raises(rel.RestartFailed, match="port 8080 in use") as caught:
        rel.switch_current(conn, base, "2.0.0", restart="echo 'port 8080 in use' >&2; exit 3")
    assert caught.value.previous == "1.0.0"
    again = pickle.loads(pickle.dumps(caught.value))  # how Prefect persists a failed result
    assert (again.previous, str(again)) == ("1.0.0", str(caught.value))
    assert os.readlink(Path(base) / "current") == "releases/2.0.0"  # switched: roll back
    assert rel.switch_current(conn, base, "1.0.0", restart="true") == "2.0.0"


def test_crashed_host_drops_established_connections(hosts):
    victim = hosts[1]
    conn = SSHConnection.from_host(victim, connect_timeout=3)
    try:
        assert conn.run("echo up", check=True).stdout.strip() == "up"
        assert crash_host(victim) is True
        with pytest.raises(HostUnreachable):
            conn.run("echo still-up", timeout=10)
    finally:
        conn.close()
        start_host(victim)
    with SSHConnection.from_host(victim) as again:
        assert again.run("echo back", check=True).stdout.strip() == "back"


def test_activate_probes_health_in_the_same_round_trip(conn, hosts, tmp_path):
    base = f"{hosts[0].root}/srv/probe"
    local = Path(base)
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        t = tarball(tmp_path, v)
        rel.stage_release(conn, base, v, t, rel.file_sha256(t))
    # The probe runs after the restart (it sees the restart's mark) in the session's directory.
    ok = rel.activate(
        conn,
        base,
        "1.0.0",
        restart=f"echo up > {local}/state; echo restarting",
        health=f"cat {local}/state; echo from $(pwd)",
    )
    assert ok == rel.Switched(None, (True, f"exit 0: from {conn.run('pwd').stdout.strip()}"))
    bad = rel.activate(
        conn,
        base,
        "2.0.0",
        restart="true",
        health="echo 'db unreachable' >&2; exit 3",
    )
    assert bad == rel.Switched("1.0.0", (False, "exit 3: db unreachable"))
    assert os.readlink(local / "current") == "releases/2.0.0"  # switched: the caller decides
    slow = rel.activate(
        conn, base, "3.0.0", restart="true", health="sleep 30; echo late", health_timeout=0.5
    )
    assert slow == rel.Switched("2.0.0", (False, "timed out after 0.5s"))
    with pytest.raises(ValueError, match="restart"):
        rel.activate(conn, base, "1.0.0", health="true")
    with pytest.raises(ValueError, match="prun"):
        rel.activate(conn, base, "1.0.0", restart="true", prune_keep=1)
    assert os.readlink(local / "current") == "releases/3.0.0"  # the refused calls changed nothing
    assert slow.pruned == ()  # an unhealthy host prunes nothing
    # Healthy: prune in the same trip, never the new current (1.0.0, the oldest) nor the
    # previous (3.0.0), even beyond keep.
    back = rel.activate(conn, base, "1.0.0", restart="true", health="true", prune_keep=1)
    assert back == rel.Switched("3.0.0", (True, "exit 0"), ("2.0.0",))
    assert sorted(os.listdir(local / "releases")) == ["1.0.0", "3.0.0"]


def test_prune_keeps_current_protected_and_foreign_names(conn, hosts, tmp_path):
    base = f"{hosts[0].root}/srv/prune"
    local = Path(base)
    for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0"):
        t = tarball(tmp_path, v)
        rel.stage_release(conn, base, v, t, rel.file_sha256(t))
        time.sleep(0.01)
    rel.switch_current(conn, base, "1.0.0")  # the oldest is live
    odd = local / "releases" / "not a release"
    odd.mkdir()
    old = time.time() - 3600
    os.utime(odd, (old, old))
    removed = rel.prune_releases(conn, base, keep=2, protect=["2.0.0", None])
    assert removed == ["3.0.0"]
    assert sorted(os.listdir(local / "releases")) == [
        "1.0.0",
        "2.0.0",
        "4.0.0",
        "5.0.0",
        "not a release",
    ]
    with pytest.raises(rel.UnsafeValueError):
        rel.prune_releases(conn, base, keep=1, protect=["x; rm -rf /"])
    assert rel.prune_releases(conn, f"{hosts[0].root}/srv/nothing-here", keep=1) == []
