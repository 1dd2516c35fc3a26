"""Run commands and move files on hosts over SSH (paramiko), one host or a fleet at a time.

``SSHConnection`` records its parameters and connects on first use (one transport per
connection, SFTP opened lazily and reused); it is a context manager. Host keys are checked
against the given known_hosts file and unknown or changed keys are refused unless
``allow_unknown_hosts`` (trust on first use; a changed key is refused even then).
``Fleet`` runs one step per host with bounded concurrency and returns a per-host outcome; one
host's failure never raises.

Errors (``kmpops.errors``): HostUnreachable (TCP connect / handshake / transport lost),
HostKeyRejected, AuthenticationFailed, ConnectorError (bad key file, SFTP failure),
CommandTimeout, CommandFailed (``check=True``), NotFound (missing remote file).

Every wait is bounded: connecting by ``connect_timeout``, a command by its ``timeout``, and each
SFTP request by ``sftp_timeout`` (the SFTP channel's timeout: a stalled sftp-server fails the
operation with CommandTimeout naming the host, the operation and the path, even while the SSH
connection itself still answers keepalives).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import socket
import stat as stat_module
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Generic, Protocol, Self, TypeVar

import paramiko

from kmpops import shellsafe
from kmpops.connectors._closing import Closing
from kmpops.errors import (
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    ConnectorError,
    HostKeyRejected,
    HostUnreachable,
    NotFound,
    UnsafeValueError,
)

__all__ = [
    "CommandResult",
    "Fleet",
    "HostLike",
    "HostOutcome",
    "RemoteStat",
    "SSHConnection",
]

T = TypeVar("T")

_READ_CHUNK = 1 << 16
_STDERR_TAIL = 600
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_known_hosts_lock = threading.Lock()
# Ciphers: paramiko's default order (aes128-ctr + hmac-sha2-256 first). Preferring AES-GCM
# halves the client's cost per byte, but OpenSSH 9.2 with OpenSSL 3.0 spends ~55 ms more CPU per
# fresh connection on it: 50 hosts x 5 MiB staged, sshd CPU 7.9 s (GCM) vs 5.1 s (CTR), wall
# 4.4 s vs 3.1 s (bench/README.md). Deploys open many short connections, so CTR stays first.


class HostLike(Protocol):
    """What ``SSHConnection.from_host`` and ``Fleet`` need of a host (``kmpops.config.Host``)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def key_file(self) -> Path: ...
    @property
    def known_hosts(self) -> Path: ...


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did: exit status, decoded output and how long it took."""

    host: str
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0."""
        return self.exit_status == 0

    def check(self) -> CommandResult:
        """Return self if the command succeeded; raise CommandFailed (with a stderr tail)."""
        if self.ok:
            return self
        tail = self.stderr.strip()[-_STDERR_TAIL:] or self.stdout.strip()[-_STDERR_TAIL:]
        raise CommandFailed(
            f"host {self.host}: command {self.command!r} exited {self.exit_status}"
            + (f": {tail}" if tail else ""),
            result=self,
        )


@dataclass(frozen=True)
class RemoteStat:
    """The attributes of a remote file (``stat``, links followed)."""

    path: str
    size: int
    mode: int
    mtime: float

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat_module.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return stat_module.S_ISREG(self.mode)


def _known_hosts_name(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def _load_private_key(key_file: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(key_file)
    except FileNotFoundError as exc:
        raise ConnectorError(f"SSH key file {key_file} does not exist") from exc
    except PermissionError as exc:
        raise ConnectorError(f"SSH key file {key_file} is not readable") from exc
    except paramiko.PasswordRequiredException as exc:
        raise ConnectorError(
            f"SSH key file {key_file} is encrypted; use an unencrypted key or an agent"
        ) from exc
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise ConnectorError(f"SSH key file {key_file} is not a usable private key") from exc


class SSHConnection(Closing):
    """A lazy SSH connection to one host; a context manager that closes it at exit.

    Not safe for concurrent use from several threads (``Fleet`` gives each host one worker at
    a time). If the transport dies (daemon restarted, network cut), the next call reconnects.
    """

    def __init__(
        self,
        *,
        name: str,
        address: str,
        port: int = 22,
        user: str,
        key_file: Path,
        known_hosts: Path,
        connect_timeout: float = 10,
        allow_unknown_hosts: bool = False,
        sftp_timeout: float = 60,
    ) -> None:
        self.name = name
        self.address = address
        self.port = int(port)
        self.user = user
        self.key_file = Path(key_file)
        self.known_hosts = Path(known_hosts)
        self.connect_timeout = connect_timeout
        self.allow_unknown_hosts = allow_unknown_hosts
        if not sftp_timeout > 0:
            raise ValueError(f"sftp_timeout must be more than 0 seconds, not {sftp_timeout!r}")
        self.sftp_timeout = float(sftp_timeout)
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_host(cls, host: HostLike, **options: Any) -> SSHConnection:
        """A connection to ``host`` (anything with name/address/port/user/key_file/known_hosts).

        ``options`` go to the constructor (``connect_timeout``, ``allow_unknown_hosts``,
        ``sftp_timeout``; ``kmpops.config.Timeouts.ssh_options()`` gives the configured bounds).
        """
        return cls(
            name=host.name,
            address=host.address,
            port=host.port,
            user=host.user,
            key_file=host.key_file,
            known_hosts=host.known_hosts,
            **options,
        )

    def __repr__(self) -> str:
        return f"SSHConnection({self.name!r}, {self.user}@{self.address}:{self.port})"

    @property
    def _where(self) -> str:
        return f"host {self.name} ({self.address}:{self.port})"

    # -- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True if a live transport is open (no I/O)."""
        return self._transport is not None and self._transport.is_active()

    def connect(self) -> Self:
        """Connect now if not connected (otherwise every call connects on demand); return self.

        Raises HostUnreachable, HostKeyRejected, AuthenticationFailed or ConnectorError (key file).
        """
        self._ensure_transport()
        return self

    def _ensure_transport(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            self._drop()
            self._transport = self._open_transport()
            return self._transport

    def _open_transport(self) -> paramiko.Transport:
        pkey = _load_private_key(self.key_file)
        host_keys = self._load_known_hosts()
        hostname = _known_hosts_name(self.address, self.port)
        ours = host_keys.lookup(hostname)
        try:
            sock = socket.create_connection((self.address, self.port), self.connect_timeout)
        except TimeoutError as exc:
            raise HostUnreachable(
                f"{self._where}: TCP connect timed out after {self.connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise HostUnreachable(f"{self._where}: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            options = transport.get_security_options()
            if ours is not None and len(ours):
                first = ours.keys()[0]
                options.key_types = [first, *(k for k in options.key_types if k != first)]
            try:
                transport.start_client(timeout=self.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise HostUnreachable(f"{self._where}: SSH handshake failed: {exc}") from exc
            self._check_host_key(transport.get_remote_server_key(), ours, hostname)
            transport.auth_timeout = self.connect_timeout
            try:
                transport.auth_publickey(self.user, pkey)
            except paramiko.AuthenticationException as exc:
                raise AuthenticationFailed(
                    f"{self._where}: user {self.user} with key {self.key_file} was refused"
                ) from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise HostUnreachable(f"{self._where}: connection lost during auth: {exc}") from exc
            if not transport.is_authenticated():
                raise AuthenticationFailed(
                    f"{self._where}: user {self.user} with key {self.key_file} was refused"
                )
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(30)
        return transport

    def _load_known_hosts(self) -> paramiko.HostKeys:
        host_keys = paramiko.HostKeys()
        try:
            host_keys.load(str(self.known_hosts))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConnectorError(f"known_hosts file {self.known_hosts} is not readable") from exc
        return host_keys

    def _check_host_key(
        self, server_key: paramiko.PKey, ours: Mapping[str, paramiko.PKey] | None, hostname: str
    ) -> None:
        if ours:
            expected = ours.get(server_key.get_name())
            if expected is None or expected != server_key:
                known = expected or next(iter(ours.values()))
                raise HostKeyRejected(
                    f"{self._where}: host key changed: {self.known_hosts} has "
                    f"{known.get_name()} {known.fingerprint}, the host offered "
                    f"{server_key.get_name()} {server_key.fingerprint}"
                ) from paramiko.BadHostKeyException(hostname, server_key, known)
            return
        if not self.allow_unknown_hosts:
            missing = "" if self.known_hosts.exists() else " (file does not exist)"
            raise HostKeyRejected(
                f"{self._where}: host key not in {self.known_hosts}{missing}; offered "
                f"{server_key.get_name()} {server_key.fingerprint}"
            )
        # Trust on first use (AutoAddPolicy): remember the key so later connections verify it.
        with _known_hosts_lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as fh:
                fh.write(f"{hostname} {server_key.get_name()} {server_key.get_base64()}\n")

    def _drop(self) -> None:
        sftp, transport = self._sftp, self._transport
        self._sftp = self._transport = None
        if sftp is not None:
            with contextlib.suppress(Exception):
                sftp.close()
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

    def close(self) -> None:
        """Close the SFTP session and the transport; the connection may be used again later."""
        with self._lock:
            self._drop()

    # -- commands ---------------------------------------------------------------------------

    def run(
        self,
        command: Sequence[str] | str,
        *,
        timeout: float = 60.0,
        check: bool = False,
        stdin: bytes | IO[bytes] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run ``command`` on the host and return its result.

        A sequence is quoted word by word (``shellsafe.join``); a string is passed to the
        remote shell as is and must come from code (or ``shellsafe.render_command``), never
        from input. ``stdin`` (bytes, or a binary file streamed in whole packets without reading
        it whole) is sent and then closed (stdin is always closed, so nothing waits on it).
        ``env`` is exported by a quoted ``export`` prefix (it does not depend on the server's
        AcceptEnv; values are visible in the remote process list, so pass secrets on
        ``stdin``); names must be identifiers. ``result.command`` never contains the env.

        ``exit_status`` is -1 if the session ended without one (the command was killed by a
        signal). Raises CommandTimeout if the command runs past ``timeout`` seconds (the channel
        is closed; the remote process may linger), CommandFailed if ``check`` and the exit
        status is not 0, ConnectorError if a ``stdin`` file fails to read (the channel is closed,
        so the command sees its input end early: a command fed from a file must verify what it
        read, as ``release.stage_release`` does with the sha256; the connection stays usable),
        HostUnreachable if the transport is lost, plus the connect errors.
        """
        text = command if isinstance(command, str) else shellsafe.join(command)
        remote = text
        if env:
            exports = []
            for key, value in env.items():
                if not _ENV_NAME.fullmatch(key):
                    raise UnsafeValueError(f"env: {key!r} is not a variable name")
                exports.append(f"{key}={shellsafe.quote(value)}")
            remote = f"export {' '.join(exports)}; {text}"
        transport = self._ensure_transport()
        started = time.monotonic()
        deadline = started + timeout
        read_errors: list[Exception] = []
        try:
            channel = transport.open_session(timeout=min(timeout, self.connect_timeout))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise HostUnreachable(f"{self._where}: cannot open a session: {exc}") from exc
        try:
            channel.settimeout(timeout)
            channel.exec_command(remote)
            sender = None
            if stdin:  # bytes or a file, sent from a thread: large input never blocks output
                source = io.BytesIO(stdin) if isinstance(stdin, bytes | bytearray) else stdin
                sender = threading.Thread(
                    target=_stream_stdin,
                    args=(channel, source, read_errors),
                    daemon=True,
                    name="ssh-stdin",
                )
                sender.start()
            else:
                channel.shutdown_write()
            stdout, stderr, status = _collect(channel, deadline)
            if sender is not None:
                sender.join(max(0.0, deadline - time.monotonic()))
        except _Deadline:
            raise CommandTimeout(
                f"{self._where}: command {text!r} timed out after {timeout:g}s"
            ) from None
        except TimeoutError as exc:
            raise CommandTimeout(
                f"{self._where}: command {text!r} timed out after {timeout:g}s"
            ) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if read_errors:  # we hung up on the command ourselves; the connection is fine
                raise ConnectorError(
                    f"{self._where}: reading the input of {text!r} failed: {read_errors[0]}"
                ) from read_errors[0]
            self.close()
            raise HostUnreachable(f"{self._where}: connection lost running {text!r}") from exc
        finally:
            channel.close()
        if read_errors:
            raise ConnectorError(
                f"{self._where}: reading the input of {text!r} failed: {read_errors[0]}"
            ) from read_errors[0]
        if status < 0:
            # No exit status: the session ended without one (killed by a signal, sshd gone).
            if not transport.is_active():
                self.close()
                raise HostUnreachable(f"{self._where}: connection lost running {text!r}")
        result = CommandResult(
            host=self.name,
            command=text,
            exit_status=status,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            duration_s=time.monotonic() - started,
        )
        return result.check() if check else result

    # -- files ------------------------------------------------------------------------------

    def _ensure_sftp(self) -> paramiko.SFTPClient:
        transport = self._ensure_transport()
        with self._lock:
            if self._sftp is not None and self._sftp.get_channel().get_transport() is transport:
                return self._sftp
            try:
                self._sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise HostUnreachable(f"{self._where}: cannot open SFTP: {exc}") from exc
            if self._sftp is None:
                raise ConnectorError(f"{self._where}: SFTP subsystem refused")
            # every request (and every send into a full window) gives up after this long
            self._sftp.get_channel().settimeout(self.sftp_timeout)
            return self._sftp

    @contextlib.contextmanager
    def _sftp_errors(self, what: str, remote: str) -> Iterator[paramiko.SFTPClient]:
        sftp = self._ensure_sftp()
        try:
            yield sftp
        except FileNotFoundError as exc:
            raise NotFound(f"{self._where}: {remote} does not exist ({what})") from exc
        except TimeoutError as exc:
            self._drop_sftp(sftp)  # its replies may still come: never reuse this session
            raise CommandTimeout(
                f"{self._where}: {what} {remote} timed out after {self.sftp_timeout:g}s "
                "(the SFTP server stopped answering)"
            ) from exc
        except PermissionError as exc:
            raise ConnectorError(f"{self._where}: {what} {remote}: permission denied") from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            if not self.connected:
                self.close()
                raise HostUnreachable(f"{self._where}: connection lost ({what} {remote})") from exc
            raise ConnectorError(f"{self._where}: {what} {remote} failed: {exc}") from exc

    def _drop_sftp(self, sftp: paramiko.SFTPClient) -> None:
        with self._lock:
            if self._sftp is sftp:
                self._sftp = None
        with contextlib.suppress(Exception):
            sftp.close()

    def put(self, local: Path | IO[bytes], remote: str, *, mode: int | None = None) -> int:
        """Upload ``local`` (a path or a binary file object) to ``remote``; return bytes sent.

        Atomic: the data goes to a temporary name beside ``remote`` which is renamed over it
        only when complete (and chmod-ed to ``mode`` first), so readers never see half a file.
        On failure the temporary file is removed (not after a timeout: the stalled server would
        not answer; the ``.kmpops-*.part`` name is never taken for the file). Raises NotFound if
        the remote directory does not exist, CommandTimeout if the SFTP server stops answering
        for ``sftp_timeout``, ConnectorError / HostUnreachable otherwise.
        """
        tmp = f"{remote}.kmpops-{uuid.uuid4().hex[:12]}.part"
        sent = [0]

        def progress(transferred: int, _total: int) -> None:
            sent[0] = transferred

        with self._sftp_errors("upload to", remote) as sftp:
            try:
                if isinstance(local, str | os.PathLike):
                    with open(local, "rb") as fh:
                        sftp.putfo(fh, tmp, callback=progress, confirm=False)
                else:
                    sftp.putfo(local, tmp, callback=progress, confirm=False)
                if mode is not None:
                    sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, remote)
            except BaseException as exc:
                if not isinstance(exc, TimeoutError):  # a stalled server would stall this too
                    with contextlib.suppress(Exception):
                        sftp.remove(tmp)
                raise
        return sent[0]

    def put_bytes(self, data: bytes, remote: str, *, mode: int | None = None) -> int:
        """Upload ``data`` to ``remote`` atomically (see :meth:`put`); return its length."""
        import io

        return self.put(io.BytesIO(data), remote, mode=mode)

    def get(self, remote: str, local: Path) -> int:
        """Download ``remote`` to ``local`` (written to a temp name, then renamed); return bytes.

        Raises NotFound if ``remote`` does not exist.
        """
        local = Path(local)
        tmp = local.with_name(f".{local.name}.kmpops-{uuid.uuid4().hex[:12]}.part")
        try:
            with self._sftp_errors("download of", remote) as sftp, open(tmp, "wb") as fh:
                size = sftp.getfo(remote, fh)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return int(size)

    def read_bytes(self, remote: str) -> bytes:
        """The content of ``remote``. Raises NotFound if it does not exist."""
        with self._sftp_errors("read of", remote) as sftp, sftp.open(remote, "rb") as fh:
            fh.prefetch()
            return fh.read()

    def stat(self, remote: str) -> RemoteStat:
        """The attributes of ``remote`` (links followed). Raises NotFound if it does not exist."""
        with self._sftp_errors("stat of", remote) as sftp:
            attrs = sftp.stat(remote)
        return RemoteStat(
            path=remote,
            size=int(attrs.st_size or 0),
            mode=int(attrs.st_mode or 0),
            mtime=float(attrs.st_mtime or 0),
        )


class _Deadline(Exception):
    """Internal: the command's deadline passed."""


def _stream_stdin(channel: paramiko.Channel, source: IO[bytes], errors: list[Exception]) -> None:
    # Read whole packets' worth: paramiko sends at most max_packet - 64 bytes per packet, so a
    # 32 KiB read became a full packet plus a 64-byte one, and every packet costs the daemon a
    # wake-up, a MAC and a pipe write (50 x 5 MiB into `cat`: sshd 3.5 -> 3.0 CPU-s, measured
    # once on the loaded 2-core machine).
    size = max(1, channel.out_max_packet_size - 64) * 8
    while True:
        try:
            chunk = source.read(size)
        except Exception as exc:
            # Stop here and let the caller raise it (SSH cannot tell the command "your input
            # is broken": it sees the end of its input, so it must verify what it read).
            errors.append(exc)
            with contextlib.suppress(Exception):
                channel.close()
            return
        if not chunk:
            break
        try:
            channel.sendall(chunk)
        except Exception:  # the command exited or the connection broke: the caller sees it
            return
    with contextlib.suppress(Exception):
        channel.shutdown_write()


def _collect(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes, int]:
    """Read stdout and stderr until EOF and the exit status, both drained as they arrive."""
    out: list[bytes] = []
    err: list[bytes] = []
    ready_fd = channel.fileno()  # becomes readable when stdout *or* stderr has data or at EOF

    def drain() -> None:
        while channel.recv_ready():
            out.append(channel.recv(_READ_CHUNK))
        while channel.recv_stderr_ready():
            err.append(channel.recv_stderr(_READ_CHUNK))

    while not channel.eof_received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        select.select([ready_fd], [], [], remaining)
        drain()
        if channel.closed:
            break
    drain()
    # Buffers may still hold data that arrived with EOF.
    while chunk := channel.recv(_READ_CHUNK):
        out.append(chunk)
    while chunk := channel.recv_stderr(_READ_CHUNK):
        err.append(chunk)
    if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
        if channel.closed:
            return b"".join(out), b"".join(err), -1
        raise _Deadline
    return b"".join(out), b"".join(err), channel.recv_exit_status()


@dataclass
class HostOutcome(Generic[T]):
    """The outcome of one step on one host: its value or the error it raised."""

    host: str
    ok: bool
    value: T | None
    error: BaseException | None
    duration_s: float

    def unwrap(self) -> T:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@dataclass
class _Slot:
    host: Any
    connection: SSHConnection | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Fleet:
    """Run a step on many hosts at once, with bounded concurrency and per-host outcomes.

    Used as a context manager, connections stay open across ``run()`` calls and are closed at
    exit; otherwise each ``run()`` closes the connections it opened. ``connect`` builds a
    connection from a host (default ``SSHConnection.from_host``).
    """

    def __init__(
        self,
        hosts: Sequence[HostLike],
        *,
        max_workers: int = 16,
        connect: Callable[[Any], SSHConnection] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._slots: dict[str, _Slot] = {}
        for host in hosts:
            if host.name in self._slots:
                raise ValueError(f"host {host.name} is listed twice")
            self._slots[host.name] = _Slot(host)
        self.max_workers = max_workers
        self._connect = connect or SSHConnection.from_host
        self._pool: ThreadPoolExecutor | None = None
        self._entered = False

    @property
    def host_names(self) -> list[str]:
        """The names of the fleet's hosts, in order."""
        return list(self._slots)

    def connection(self, name: str) -> SSHConnection:
        """The (lazy) connection to host ``name``; raises NotFound for an unknown host."""
        try:
            slot = self._slots[name]
        except KeyError:
            raise NotFound(f"host {name} is not in this fleet") from None
        if slot.connection is None:
            slot.connection = self._connect(slot.host)
        return slot.connection

    def run(
        self, step: Callable[[SSHConnection], T], *, hosts: Sequence[str] | None = None
    ) -> dict[str, HostOutcome[T]]:
        """Call ``step(connection)`` once per host (all, or ``hosts``) and collect outcomes.

        Returns ``{host name: HostOutcome}`` in the order asked. Never raises for a host's
        failure (connect errors included); raises NotFound for a name not in the fleet.
        """
        names = list(self._slots) if hosts is None else list(hosts)
        for name in names:
            if name not in self._slots:
                raise NotFound(f"host {name} is not in this fleet")
        if not names:
            return {}
        pool = self._pool
        own_pool = pool is None
        if pool is None:
            pool = ThreadPoolExecutor(
                max_workers=min(self.max_workers, len(names)), thread_name_prefix="fleet"
            )
        try:
            futures = {name: pool.submit(self._run_one, name, step) for name in names}
            return {name: future.result() for name, future in futures.items()}
        finally:
            if own_pool:
                pool.shutdown(wait=True)
                if not self._entered:
                    self.close()

    def _run_one(self, name: str, step: Callable[[SSHConnection], T]) -> HostOutcome[T]:
        started = time.monotonic()
        slot = self._slots[name]
        with slot.lock:
            try:
                value = step(self.connection(name))
            except Exception as exc:
                return HostOutcome(name, False, None, exc, time.monotonic() - started)
        return HostOutcome(name, True, value, None, time.monotonic() - started)

    def close(self) -> None:
        """Close every open connection (the fleet can be used again; it reconnects)."""
        for slot in self._slots.values():
            if slot.connection is not None:
                slot.connection.close()

    def __enter__(self) -> Self:
        self._entered = True
        self._pool = ThreadPoolExecutor(
            max_workers=min(self.max_workers, max(1, len(self._slots))),
            thread_name_prefix="fleet",
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        self._entered = False
        if pool is not None:
            pool.shutdown(wait=True)
        self.close()
