"""A fleet of real OpenSSH daemons on 127.0.0.1 for tests, demos and benchmarks.

Each host is one ``/usr/sbin/sshd -D`` with its own config, host key, log and pid file under
``<root>/hosts/<name>/``; that directory is the host's "root" (deploys go below it) and is the
session's ``HOME``, so no login-shell rc file of the machine's user is read. No users are
created and nothing of the machine is changed except that ``/run/sshd`` (sshd's privilege
separation directory) is created if it is missing. Daemons are stopped by pid file only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kmpops.stack._proc import (
    StackError,
    read_pid,
    start_process,
    stop_process,
    wait_for_port,
    wait_for_ports,
)

__all__ = [
    "SSHD_BINARY",
    "SSHDOptions",
    "SSHHostInfo",
    "crash_host",
    "host_certificate_file",
    "host_info",
    "new_key_pair",
    "sign_key",
    "start_bastion",
    "start_fleet",
    "start_host",
    "stop_fleet",
    "stop_host",
]

SSHD_BINARY = "/usr/sbin/sshd"
ADDRESS = "127.0.0.1"
_PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SSHHostInfo:
    """One local sshd: where it listens and where its files are.

    ``address`` and ``user`` make it usable wherever a host-like object is expected
    (``SSHConnection.from_host(info)``, ``Fleet([info, ...])``).
    """

    name: str
    port: int
    root: Path
    key_file: Path
    known_hosts: Path
    pid_file: Path

    @property
    def address(self) -> str:
        """The address the daemon listens on (always loopback)."""
        return ADDRESS

    @property
    def user(self) -> str:
        """The user to log in as: the user running the daemons."""
        return pwd.getpwuid(os.getuid()).pw_name

    @property
    def host_key_file(self) -> Path:
        """The daemon's private ed25519 host key."""
        return self.root / "etc" / "ssh_host_ed25519_key"

    @property
    def config_file(self) -> Path:
        """The daemon's sshd_config."""
        return self.root / "etc" / "sshd_config"

    @property
    def log_file(self) -> Path:
        """The daemon's log (``sshd -E``)."""
        return self.root / "log" / "sshd.log"


def host_info(root: Path, name: str, port: int) -> SSHHostInfo:
    """The :class:`SSHHostInfo` of host ``name`` of the fleet under ``root`` (no I/O)."""
    root = Path(root).resolve()
    host_root = (root / "hosts").resolve() / name  # hosts/ may point where a deploy user reaches
    return SSHHostInfo(
        name=name,
        port=port,
        root=host_root,
        key_file=root / "keys" / "id_ed25519",
        known_hosts=root / "known_hosts",
        pid_file=host_root / "run" / "sshd.pid",
    )


def _new_ed25519(private_path: Path, comment: str) -> str:
    """Write a new ed25519 key pair (OpenSSH format, mode 0600) and return the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{public.decode()} {comment}"
    private_path.parent.mkdir(parents=True, exist_ok=True)
    from kmpops.secrets import write_secret_file

    private_path.with_name(private_path.name + ".pub").write_text(line + "\n")
    write_secret_file(private_path, private)
    return line


def _ensure_key(private_path: Path, comment: str) -> str:
    """The public key line of ``private_path``, creating the pair if it is missing."""
    pub = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and pub.exists():
        return pub.read_text().strip()
    return _new_ed25519(private_path, comment)


def _sshd_config(info: SSHHostInfo, authorized_keys: Path) -> str:
    return "\n".join(
        [
            f"# kmp-ops local sshd for host {info.name}; generated, do not edit",
            f"Port {info.port}",
            f"ListenAddress {ADDRESS}",
            f"HostKey {info.host_key_file}",
            # Our pid file is written by the launcher; sshd writing it too (truncate, then write,
            # after it listens) let a reader see it empty and take a live daemon for dead.
            "PidFile none",
            f"AuthorizedKeysFile {authorized_keys}",
            "UsePAM no",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding no",
            "PermitTunnel no",
            "MaxStartups 200",
            "MaxSessions 64",
            "LogLevel INFO",
            # The session's HOME is the host root: the machine user's ~/.bashrc is not read and
            # relative paths in commands resolve the same way on every host.
            f"SetEnv HOME={info.root} KMPOPS_HOST={info.name} KMPOPS_HOST_ROOT={info.root}",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _prepare_host(
    info: SSHHostInfo, client_public: str, options: SSHDOptions | None = None
) -> None:
    """Create the host's directories, host key, authorized_keys and config (idempotent)."""
    for sub in ("etc", "log", "run", "srv", "tmp"):
        (info.root / sub).mkdir(parents=True, exist_ok=True)
    _ensure_key(info.host_key_file, f"kmpops-host-{info.name}")
    authorized_keys = info.root / "etc" / "authorized_keys"
    authorize = options is None or options.authorize_client_key
    authorized_keys.write_text(client_public + "\n" if authorize else "")
    config = _sshd_config(info, authorized_keys)
    if options is not None:
        config = _apply_options(config, info, options)
    info.config_file.write_text(config)


@dataclass(frozen=True)
class SSHDOptions:
    """What a fleet's daemons allow beyond the defaults: TCP forwarding (a bastion), a log level
    (``VERBOSE``/``DEBUG1`` to see forwarded connections), a CA trusted for user certificates
    (``TrustedUserCAKeys``), a CA that signs each host key (``HostCertificate``, principals: the
    host's address and name), and whether the client's plain key is in authorized_keys."""

    allow_tcp_forwarding: bool = False
    log_level: str = "INFO"
    trusted_user_ca: Path | None = None
    host_ca_key: Path | None = None
    authorize_client_key: bool = True


def host_certificate_file(info: SSHHostInfo) -> Path:
    """Where the host's certificate (``ssh-keygen -s``) is written when a host CA is given."""
    return info.host_key_file.with_name(info.host_key_file.name + "-cert.pub")


def sign_key(
    ca_key: Path,
    public_key: Path,
    *,
    identity: str,
    principals: Sequence[str],
    host: bool = False,
    validity: str = "-5m:+1d",
) -> Path:
    """Sign ``public_key`` with ``ca_key`` (OpenSSH ``ssh-keygen -s``); return the certificate
    path (``<key>-cert.pub``). Raises StackError with ssh-keygen's message if it fails."""
    import subprocess

    command = ["ssh-keygen", "-q", "-s", str(ca_key), "-I", identity, "-V", validity]
    command += ["-n", ",".join(principals)]
    if host:
        command.append("-h")
    done = subprocess.run(
        [*command, str(public_key)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise StackError(f"ssh-keygen -s {ca_key} {public_key}: {done.stderr.strip()}")
    stem = str(public_key).removesuffix(".pub")
    return Path(f"{stem}-cert.pub")


def new_key_pair(private_path: Path, comment: str) -> str:
    """Write a new ed25519 key pair at ``private_path`` (mode 0600) and its ``.pub``; return the
    public line. For CAs and test keys."""
    return _new_ed25519(private_path, comment)


def _apply_options(config: str, info: SSHHostInfo, options: SSHDOptions) -> str:
    if not re.fullmatch(r"QUIET|FATAL|ERROR|INFO|VERBOSE|DEBUG[123]?", options.log_level):
        raise StackError(f"sshd log level {options.log_level!r} is not one of sshd's")
    lines = config.splitlines()
    lines = [
        f"LogLevel {options.log_level}"
        if line.startswith("LogLevel ")
        else ("AllowTcpForwarding yes" if options.allow_tcp_forwarding else line)
        if line.startswith("AllowTcpForwarding ")
        else line
        for line in lines
    ]
    extra: list[str] = []
    if options.trusted_user_ca is not None:
        extra.append(f"TrustedUserCAKeys {options.trusted_user_ca}")
    if options.host_ca_key is not None:
        public = info.host_key_file.with_name(info.host_key_file.name + ".pub")
        cert = sign_key(
            options.host_ca_key,
            public,
            identity=f"kmpops-host-{info.name}",
            principals=[ADDRESS, info.name],
            host=True,
        )
        extra.append(f"HostCertificate {cert}")
    index = next(i for i, line in enumerate(lines) if line.startswith("Subsystem "))
    return "\n".join(lines[:index] + extra + lines[index:]) + "\n"


def _write_known_hosts(known_hosts: Path, infos: Sequence[SSHHostInfo]) -> None:
    """Add or replace the ``[127.0.0.1]:port`` lines of ``infos``; keep other lines."""
    ours = {f"[{ADDRESS}]:{info.port}": info for info in infos}
    kept: list[str] = []
    if known_hosts.exists():
        for line in known_hosts.read_text().splitlines():
            pattern = line.split(" ", 1)[0]
            if line.strip() and pattern not in ours:
                kept.append(line)
    for pattern, info in ours.items():
        public = info.host_key_file.with_name(info.host_key_file.name + ".pub").read_text()
        key_type, key_b64 = public.split()[:2]
        kept.append(f"{pattern} {key_type} {key_b64}")
    tmp = known_hosts.with_name(known_hosts.name + ".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.replace(tmp, known_hosts)


def _launch(info: SSHHostInfo) -> None:
    start_process(
        [SSHD_BINARY, "-D", "-f", str(info.config_file), "-E", str(info.log_file)],
        pid_file=info.pid_file,
        log_file=info.root / "log" / "sshd.stdout.log",
        cwd=info.root,
    )


def _wait(info: SSHHostInfo, timeout: float) -> None:
    try:
        wait_for_port(info.port, timeout=timeout, what=f"sshd {info.name}", pid_file=info.pid_file)
    except StackError as exc:
        tail = ""
        if info.log_file.exists():
            tail = " | ".join(info.log_file.read_text(errors="replace").splitlines()[-3:])
        raise StackError(f"{exc} (log {info.log_file}: {tail})") from exc


def start_fleet(
    root: Path,
    names: Sequence[str],
    ports: Sequence[int],
    *,
    timeout: float = 30.0,
    options: SSHDOptions | None = None,
) -> list[SSHHostInfo]:
    """Start one sshd per ``(name, port)`` under ``root``; return their infos in order.

    Idempotent: keys are created only if missing and a daemon whose pid file names a live
    process is left running. All daemons are started first, then waited for, so 50 start in
    about a second. Raises StackError naming the host (with its log tail) if one does not listen
    within ``timeout``; the daemons already started keep running (``stop_fleet`` stops them).
    ``options`` (:class:`SSHDOptions`) apply to every daemon of this call.
    """
    if len(names) != len(ports):
        raise ValueError(f"{len(names)} names but {len(ports)} ports")
    if len(set(names)) != len(names) or len(set(ports)) != len(ports):
        raise ValueError("host names and ports must be unique")
    root = Path(root).resolve()
    (root / "keys").mkdir(parents=True, exist_ok=True)
    infos = [host_info(root, name, port) for name, port in zip(names, ports, strict=True)]
    client_public = _ensure_key(infos[0].key_file, "kmpops-client") if infos else ""
    _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    # in bulk: host roots, keys and configs by a small pool, every daemon launched, then one
    # wait for all of them (500 hosts: ~12 s one by one, see bench/README.md "growth")
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(infos)))) as pool:
        list(pool.map(lambda info: _prepare_host(info, client_public, options), infos))
        _write_known_hosts(root / "known_hosts", infos)
        list(pool.map(_launch, infos))
    try:
        wait_for_ports(
            [(info.port, f"sshd {info.name}", info.pid_file) for info in infos], timeout=timeout
        )
    except StackError:
        for info in infos:  # the one that failed, named with its log tail
            _wait(info, 0.5)
        raise
    return infos


def start_host(info: SSHHostInfo, *, timeout: float = 30.0) -> None:
    """Start the (prepared) daemon of ``info`` again, e.g. after :func:`stop_host`; idempotent."""
    _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    _launch(info)
    _wait(info, timeout)


def stop_host(info: SSHHostInfo) -> bool:
    """Stop the daemon of ``info`` by its pid file; True if one was running.

    Established sessions live in their own process groups and may outlive the listener; a
    client's next connection attempt is refused.
    """
    return stop_process(info.pid_file)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def crash_host(info: SSHHostInfo) -> bool:
    """Simulate the host going down: kill its daemon's established sessions (and what they
    run) with SIGKILL, then stop the daemon. Established connections drop, new ones are
    refused. True if a daemon was running. For tests; ``start_host`` brings it back."""
    pid = read_pid(info.pid_file)
    if pid is None:
        return False
    for child in _descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    return stop_process(info.pid_file)


def stop_fleet(root: Path) -> None:
    """Stop every daemon of the fleet under ``root`` by its pid file (no-op if none run)."""
    pid_files = sorted(Path(root).resolve().glob("hosts/*/run/sshd.pid"))
    live = [p for p in pid_files if read_pid(p) is not None]
    for stale in set(pid_files) - set(live):
        stale.unlink(missing_ok=True)
    if not live:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(live))) as pool:
        list(pool.map(stop_process, live))


def start_bastion(
    root: Path, port: int, *, name: str = "bastion", log_level: str = "DEBUG1", timeout: float = 30
) -> SSHHostInfo:
    """Start a bastion sshd under ``root`` (its own fleet root): TCP forwarding allowed, so
    clients reach the hosts behind it (``direct-tcpip``, like ``ssh -J``), logging at
    ``log_level`` so its log shows each forwarded connection ("target 127.0.0.1 port N").
    Its host key joins ``<root>/known_hosts``; the client key is ``<root>/keys/id_ed25519``.
    Idempotent like :func:`start_fleet`. Raises StackError if it does not listen in time."""
    options = SSHDOptions(allow_tcp_forwarding=True, log_level=log_level)
    return start_fleet(root, [name], [port], timeout=timeout, options=options)[0]
