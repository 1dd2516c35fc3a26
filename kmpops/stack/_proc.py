"""Process helpers for the local stack: start detached with a pid file, stop by pid, wait for ports.

Services are always stopped by the pid recorded in their pid file, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kmpops.errors import KmpOpsError


class StackError(KmpOpsError):
    """A local-stack component could not be started or stopped."""


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (and is not a zombie we own)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if it names a live process, else None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def start_process(
    argv: Sequence[str],
    *,
    pid_file: Path,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` detached in its own session, logging to ``log_file``; write its pid file.

    Idempotent: if ``pid_file`` names a live process, that pid is returned and nothing starts.
    """
    existing = read_pid(pid_file)
    if existing:
        return existing
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def stop_process(pid_file: Path, *, timeout: float = 10.0) -> bool:
    """Stop the process named by ``pid_file`` (SIGTERM, then SIGKILL); remove the file.

    Returns True if a live process was stopped. The process group is signalled too, so helpers a
    service forked (sshd session children, server workers) go with it.
    """
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            break
        _reap(pid)
        time.sleep(0.05)
    else:
        _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
        _reap(pid)
    pid_file.unlink(missing_ok=True)
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, *, timeout: float = 30.0, what: str = "service", pid_file: Path | None = None
) -> None:
    """Wait until ``port`` accepts connections; raise StackError naming ``what`` otherwise.

    With ``pid_file``, the pid it names when the wait starts is followed (the file itself is
    read once, so a service rewriting it cannot look dead): its exit fails the wait at once.
    """
    deadline = time.monotonic() + timeout
    pid = None
    if pid_file is not None:  # the pid as written, alive or not: one that already died fails
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if pid is not None and not pid_alive(pid):
            _reap(pid)
            if not port_open(port):
                raise StackError(f"{what} exited before listening on 127.0.0.1:{port}")
        time.sleep(0.05)
    raise StackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def listening_ports() -> set[int]:
    """Every TCP port in LISTEN state on this machine (any address), from /proc/net/tcp{,6}."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split(maxsplit=4)
            if len(fields) >= 4 and fields[3] == "0A":  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for_ports(waits: Sequence[tuple[int, str, Path | None]], *, timeout: float = 30.0) -> None:
    """Wait until every ``(port, what, pid_file)`` listens, all at once: one read of the
    kernel's socket tables per tick, not one connection per port (500 daemons in one loop).

    Like :func:`wait_for_port`, the pid a pid file names when the wait starts is followed: its
    exit fails the wait at once. Raises StackError naming the first daemon that exited or, at
    ``timeout``, the ones that never listened (at most five named, and how many in all).
    """
    deadline = time.monotonic() + timeout
    pending: dict[int, tuple[str, int | None]] = {}
    for port, what, pid_file in waits:
        pid = None
        if pid_file is not None:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
        pending[port] = (what, pid)
    while pending:
        listening = listening_ports()
        pending = {p: v for p, v in pending.items() if p not in listening}
        for port, (what, pid) in pending.items():
            if pid is not None and not pid_alive(pid):
                _reap(pid)
                if port not in listening_ports():
                    raise StackError(f"{what} exited before listening on 127.0.0.1:{port}")
        if not pending:
            return
        if time.monotonic() >= deadline:
            named = ", ".join(f"{w} (127.0.0.1:{p})" for p, (w, _) in list(pending.items())[:5])
            raise StackError(
                f"{len(pending)} did not listen within {timeout:.0f}s: {named}"
                + (" ..." if len(pending) > 5 else "")
            )
        time.sleep(0.05)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state on ``port`` (any local address), from /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(inode)
    return inodes


def _proc_text(pid: int, name: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def port_holder(port: int) -> str | None:
    """Who listens on ``port``: ``pid N (command line, cwd DIR)``, or None if nobody can be named.

    Reads /proc (the socket's inode, then the process whose fd points at it). Processes of other
    users may be unreadable when not root: then only the fact that the port is taken is known.
    """
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in targets:
                    pid = int(entry.name)
                    cmdline = _proc_text(pid, "cmdline")[:200] or "?"
                    try:
                        cwd = os.readlink(f"/proc/{pid}/cwd")
                    except OSError:
                        cwd = "?"
                    return f"pid {pid} ({cmdline}; cwd {cwd})"
            except OSError:
                continue
    return None


def ancestors(pid: int) -> list[int]:
    """``pid`` and its parents up to init, from /proc/<pid>/stat."""
    chain = []
    while pid > 1 and len(chain) < 64:
        chain.append(pid)
        stat = _proc_text(pid, "stat")
        if not stat:
            break
        try:
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            break
    return chain


def busy_ports(ports: Sequence[int], *, own_pids: set[int]) -> dict[int, str]:
    """The ports of ``ports`` that something other than ``own_pids`` (or their children) holds.

    Bound with SO_REUSEADDR like the servers do, so sockets in TIME_WAIT do not count. The value
    names the holder (see :func:`port_holder`) or says it could not be read.
    """
    busy: dict[int, str] = {}
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                continue
            except OSError:
                pass
        holder = port_holder(port)
        if holder is not None:
            holder_pid = int(holder.split()[1])
            if own_pids & set(ancestors(holder_pid)):
                continue
        busy[port] = holder or "a process this user cannot see (or an outgoing connection)"
    return busy
