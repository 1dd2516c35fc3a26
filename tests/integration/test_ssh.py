"""kmpops.connectors.ssh against real OpenSSH daemons started by kmpops.stack.sshd."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from kmpops.connectors.ssh import CommandResult, Fleet, HostOutcome, SSHConnection
from kmpops.errors import (
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    ConnectorError,
    HostKeyRejected,
    HostUnreachable,
    NotFound,
)
from kmpops.stack.sshd import SSHHostInfo, start_fleet, start_host, stop_fleet, stop_host

PORT_BASE = 21000
UNUSED_PORT = PORT_BASE + 99


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> list[SSHHostInfo]:
    root = tmp_path_factory.mktemp("sshd-fleet")
    names = [f"prd-{i}" for i in range(1, 5)]
    try:
        yield start_fleet(root, names, [PORT_BASE + i for i in range(1, 5)])
    finally:
        stop_fleet(root)


@pytest.fixture
def conn(hosts):
    with SSHConnection.from_host(hosts[0]) as connection:
        yield connection


def _other_conn(host: SSHHostInfo, **changes) -> SSHConnection:
    params = dict(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.user,
        key_file=host.key_file,
        known_hosts=host.known_hosts,
        connect_timeout=5,
    )
    params.update(changes)
    return SSHConnection(**params)


def test_start_fleet_is_idempotent(hosts):
    again = start_fleet(
        hosts[0].root.parent.parent, [h.name for h in hosts], [h.port for h in hosts]
    )
    assert again == hosts
    assert {h.pid_file.read_text() for h in again} == {h.pid_file.read_text() for h in hosts}


def test_run_reports_exit_status_stdout_stderr(conn):
    result = conn.run("echo out; echo err >&2; exit 3")
    assert isinstance(result, CommandResult)
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert result.host == "prd-1"
    with pytest.raises(CommandFailed) as err:
        result.check()
    assert "prd-1" in str(err.value) and "exit 3" in str(err.value) and "err" in str(err.value)
    assert err.value.result is result
    with pytest.raises(CommandFailed):
        conn.run(["false"], check=True)


def test_session_home_is_the_host_root(conn, hosts):
    result = conn.run('printf %s "$HOME"', check=True)
    assert result.stdout == str(hosts[0].root)


def test_run_argv_is_quoted_and_env_is_exported(conn):
    result = conn.run(["printf", "%s|", "a b", "$HOME", "x;y"], check=True)
    assert result.stdout == "a b|$HOME|x;y|"
    result = conn.run('printf %s "$GREETING"', env={"GREETING": "it's $(id)"}, check=True)
    assert result.stdout == "it's $(id)"
    assert result.command == 'printf %s "$GREETING"'  # the env value is not recorded


def test_run_stdin_and_large_output_do_not_deadlock(conn):
    data = os.urandom(3_000_000)
    result = conn.run("sha256sum", stdin=data, check=True, timeout=60)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    # Both streams large at once: a reader that drains only stdout would deadlock here.
    result = conn.run(
        "head -c 8000000 /dev/zero | tr '\\0' a; head -c 4000000 /dev/zero | tr '\\0' b >&2",
        check=True,
        timeout=60,
    )
    assert len(result.stdout) == 8_000_000 and len(result.stderr) == 4_000_000


def test_command_timeout(conn):
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as err:
        conn.run(["sleep", "5"], timeout=1)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5
    message = str(err.value)
    assert "prd-1" in message and "sleep 5" in message and "1s" in message
    # The connection stays usable after a timeout.
    assert conn.run("echo ok", check=True).stdout == "ok\n"


def test_unknown_host_key_is_refused(hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyRejected) as err:
        _other_conn(hosts[0], known_hosts=empty).run("true")
    assert f"host prd-1 (127.0.0.1:{hosts[0].port}): host key not in {empty}" in str(err.value)


def test_unknown_host_key_trusted_on_first_use_when_allowed(hosts, tmp_path):
    tofu = tmp_path / "known_hosts"
    with _other_conn(hosts[0], known_hosts=tofu, allow_unknown_hosts=True) as c:
        assert c.run("true").ok
    assert f"[127.0.0.1]:{hosts[0].port} ssh-ed25519 " in tofu.read_text()
    with _other_conn(hosts[0], known_hosts=tofu) as c:
        assert c.run("true").ok


def test_changed_host_key_is_refused(hosts, tmp_path):
    # known_hosts lists prd-2's key for prd-1's address: what a replaced (or spoofed) host shows.
    other_key = (hosts[1].root / "etc" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{hosts[0].port} {' '.join(other_key)}\n")
    for allow in (False, True):
        with pytest.raises(HostKeyRejected) as err:
            _other_conn(hosts[0], known_hosts=wrong, allow_unknown_hosts=allow).run("true")
        assert "host key changed" in str(err.value) and "prd-1" in str(err.value)


def test_missing_key_file(hosts, tmp_path):
    missing = tmp_path / "no_such_key"
    with pytest.raises(ConnectorError) as err:
        _other_conn(hosts[0], key_file=missing).run("true")
    assert str(missing) in str(err.value)


def test_wrong_key_is_authentication_failure(hosts, tmp_path):
    # A valid key that is not authorized: the host key of another host.
    stranger = hosts[1].root / "etc" / "ssh_host_ed25519_key"
    with pytest.raises(AuthenticationFailed) as err:
        _other_conn(hosts[0], key_file=stranger).run("true")
    assert "prd-1" in str(err.value)


def test_unreachable_port(hosts):
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as err:
        _other_conn(hosts[0], name="ghost", port=UNUSED_PORT).run("true")
    assert time.monotonic() - started < 3
    assert "ghost" in str(err.value) and f"127.0.0.1:{UNUSED_PORT}" in str(err.value)


def test_sftp_round_trip(conn, hosts, tmp_path):
    data = os.urandom(2_500_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(data)
    remote = f"{hosts[0].root}/tmp/payload-{uuid.uuid4().hex}.bin"
    assert conn.put(local, remote, mode=0o640) == len(data)
    assert conn.stat(remote).size == len(data)
    assert conn.stat(remote).mode & 0o777 == 0o640
    back = tmp_path / "back.bin"
    assert conn.get(remote, back) == len(data)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    remote_sum = conn.run(["sha256sum", remote], check=True).stdout.split()[0]
    assert remote_sum == hashlib.sha256(data).hexdigest()
    assert conn.put_bytes(b"v1\n", remote) == 3
    assert conn.read_bytes(remote) == b"v1\n"
    # No temporary files left beside the target.
    listing = conn.run(["ls", "-a", f"{hosts[0].root}/tmp"], check=True).stdout
    assert ".part" not in listing


def test_sftp_missing_remote_is_not_found(conn, hosts, tmp_path):
    with pytest.raises(NotFound):
        conn.read_bytes(f"{hosts[0].root}/no/such/file")
    with pytest.raises(NotFound):
        conn.stat(f"{hosts[0].root}/no/such/file")
    with pytest.raises(NotFound):
        conn.get(f"{hosts[0].root}/no/such/file", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quoting_creates_file_literally_and_executes_nothing(conn, hosts):
    marker = Path(f"/tmp/kmpops-pwned-{uuid.uuid4().hex}")
    parent = f"{hosts[0].root}/tmp/quoting"
    name = f"with space $(touch {marker}) `touch {marker}`; touch {marker}"
    path = f"{parent}/{name}"
    conn.run(["mkdir", "-p", os.path.dirname(path)], check=True)
    conn.run(["touch", path], check=True)
    assert conn.stat(path).is_file
    assert conn.run(["test", "-f", path]).ok
    assert not marker.exists()
    assert not conn.run(["test", "-e", str(marker)]).ok


def test_connection_reconnects_after_daemon_restart(hosts):
    host = hosts[3]
    with SSHConnection.from_host(host) as c:
        assert c.run("true").ok
        c.close()
        stop_host(host)
        with pytest.raises(HostUnreachable):
            c.run("true")
        start_host(host)
        assert c.run("echo back", check=True).stdout == "back\n"


def test_fleet_with_one_host_stopped(hosts):
    stopped = hosts[2]
    stop_host(stopped)
    try:
        with Fleet(hosts, max_workers=4) as fleet:
            outcomes = fleet.run(lambda c: c.run(["hostname"], check=True).exit_status)
    finally:
        start_host(stopped)
    assert list(outcomes) == [h.name for h in hosts]
    assert all(isinstance(o, HostOutcome) for o in outcomes.values())
    ok = [name for name, o in outcomes.items() if o.ok]
    assert ok == [h.name for h in hosts if h is not stopped]
    failed = outcomes[stopped.name]
    assert not failed.ok and failed.value is None
    assert isinstance(failed.error, HostUnreachable)
    assert stopped.name in str(failed.error)


def test_fleet_keeps_connections_across_runs_and_subsets(hosts):
    with Fleet(hosts, max_workers=2) as fleet:
        first = fleet.run(lambda c: id(c.connect()._transport))
        second = fleet.run(lambda c: id(c._transport), hosts=["prd-2", "prd-1"])
        assert list(second) == ["prd-2", "prd-1"]
        assert second["prd-1"].value == first["prd-1"].value
        with pytest.raises(NotFound):
            fleet.run(lambda c: None, hosts=["nope"])
        boom = fleet.run(lambda c: 1 / 0, hosts=["prd-1"])
        assert isinstance(boom["prd-1"].error, ZeroDivisionError)
    assert not fleet.connection("prd-1").connected


def test_an_idle_transport_wakes_once_a_second_and_still_answers(hosts):
    """paramiko's reader thread wakes every 0.1 s while nothing arrives: 500 kept-open
    connections spent ~40 % of a deploy's control-node CPU on it. Ours wakes every
    TRANSPORT_POLL_S, and the same connection answers at once after idling past a poll."""
    from kmpops.connectors.ssh import TRANSPORT_POLL_S

    assert TRANSPORT_POLL_S >= 1.0
    with Fleet(hosts, max_workers=4) as fleet:
        transports = fleet.run(lambda c: c.connect()._transport)
        for outcome in transports.values():
            assert outcome.value.sock.gettimeout() == TRANSPORT_POLL_S
        time.sleep(TRANSPORT_POLL_S * 1.5)
        again = fleet.run(lambda c: (c._transport, c.run("echo $((6*7))").stdout))
        assert {h: o.value for h, o in again.items()} == {
            h: (o.value, "42\n") for h, o in transports.items()
        }


class _SilentableRelay:
    """A TCP relay to ``port`` on loopback that can go silent like a partitioned network:
    after ``silence()`` it forwards nothing more and keeps every socket open (nothing is
    answered, nothing is reset)."""

    def __init__(self, listen_port: int, port: int) -> None:
        import socket
        import threading

        self._quiet = threading.Event()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", listen_port))
        self.port = listen_port

        def pump(src: socket.socket, dst: socket.socket) -> None:
            while not self._quiet.is_set():
                try:
                    data = src.recv(65536)
                except OSError:
                    return
                if not data or self._quiet.is_set():
                    return
                dst.sendall(data)

        def accept() -> None:
            client, _ = self._server.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def silence(self) -> None:
        self._quiet.set()

    def close(self) -> None:
        for sock in [self._server, *self._sockets]:
            sock.close()


def test_close_ends_the_transport_thread_even_when_the_host_is_silent(hosts, tmp_path, monkeypatch):
    """A host behind a network that went silent (nothing answers, nothing resets) leaves
    paramiko's reader thread in recv after close() until its next poll; close() shuts the
    socket down first, which ends the thread at once. The poll is set far past the join
    below, so only the shutdown can pass this."""
    import kmpops.connectors.ssh as ssh

    monkeypatch.setattr(ssh, "TRANSPORT_POLL_S", 60.0)
    relay = _SilentableRelay(PORT_BASE + 98, hosts[0].port)
    try:
        conn = _other_conn(
            hosts[0], port=relay.port, known_hosts=tmp_path / "kh", allow_unknown_hosts=True
        )
        assert conn.run("echo up").stdout == "up\n"
        transport = conn._transport
        assert transport is not None and transport.sock.gettimeout() == 60.0
        relay.silence()
        conn.close()
        transport.join(timeout=10)
        assert not transport.is_alive(), "the transport thread outlived close()"
    finally:
        relay.close()
