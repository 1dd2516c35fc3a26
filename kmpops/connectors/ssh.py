"""Run commands and move files on hosts over SSH (paramiko), one host or a fleet at a time.

``SSHConnection`` records its parameters and connects on first use (one transport per
connection, SFTP opened lazily and reused); it is a context manager. Host keys are checked
against the given known_hosts file and unknown or changed keys are refused unless
``allow_unknown_hosts`` (trust on first use; a changed key is refused even then).
``Fleet`` runs one step per host with bounded concurrency and returns a per-host outcome; one
host's failure never raises.

Production paths (``kmpops.config.Host`` fields, read by ``from_host``): ``jump`` hops, each a
real SSH login whose host key is checked, the next hop reached through a ``direct-tcpip``
channel (OpenSSH's ProxyJump); ssh-agent keys; encrypted keys with a passphrase reference
resolved at connect time; OpenSSH user certificates (``certificate`` or ``<key>-cert.pub``);
host certificates verified against ``@cert-authority`` lines (paramiko does not: see
``check_host_certificate``), ``@revoked`` keys refused. A certificate is never trusted on first
use.

Errors (``kmpops.errors``): HostUnreachable (TCP connect / handshake / transport lost),
HostKeyRejected, AuthenticationFailed, ConnectorError (bad key file, SFTP failure),
CommandTimeout, CommandFailed (``check=True``), NotFound (missing remote file).

Every wait is bounded: connecting by ``connect_timeout``, a command by its ``timeout``, and each
SFTP request by ``sftp_timeout`` (the SFTP channel's timeout: a stalled sftp-server fails the
operation with CommandTimeout naming the host, the operation and the path, even while the SSH
connection itself still answers keepalives).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
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
from typing import IO, Any, Protocol, Self, TypeVar

import paramiko

from kmpops import shellsafe
from kmpops.become import Become, refusal, refused_error, sudo_argv
from kmpops.config import SecretRef
from kmpops.connectors._closing import Closing
from kmpops.errors import (
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    ConnectorError,
    HostKeyRejected,
    HostUnreachable,
    KmpOpsError,
    NotFound,
    UnsafeValueError,
)
from kmpops.outcomes import HostOutcome

__all__ = [
    "CommandResult",
    "Endpoint",
    "Fleet",
    "HostCertificate",
    "HostLike",
    "HostOutcome",
    "RemoteStat",
    "SSHConnection",
    "check_host_certificate",
    "own_key_fingerprints",
    "parse_certificate",
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
    def key_file(self) -> Path | None: ...
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
            f"SSH key file {key_file} is encrypted; give key_passphrase (env:NAME or "
            "file:/path) or use an agent"
        ) from exc
    except TypeError as exc:  # cryptography's word for an OpenSSH-format encrypted key
        if "password" not in str(exc):
            raise
        raise ConnectorError(
            f"SSH key file {key_file} is encrypted; give key_passphrase (env:NAME or "
            "file:/path) or use an agent"
        ) from exc
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise ConnectorError(f"SSH key file {key_file} is not a usable private key") from exc


# -- connection paths: keys, agent, certificates, host certificates, jump hosts ----------------


@dataclass(frozen=True)
class Endpoint:
    """One SSH server on the way to a host (a jump hop, or the host itself) and how to log in.

    ``key_passphrase`` is a secret reference (``env:NAME``, ``file:/path``) or the value
    itself, resolved only when the key is loaded and never put in a message.
    """

    name: str
    address: str
    port: int
    user: str
    known_hosts: Path
    key_file: Path | None = None
    key_passphrase: SecretRef | str | None = None
    certificate: Path | None = None
    agent: bool = False
    agent_socket: Path | None = None

    @property
    def where(self) -> str:
        """How messages name this endpoint."""
        return f"host {self.name} ({self.address}:{self.port})"


def _host_connection_fields(host: Any) -> dict[str, Any]:
    """The constructor arguments beyond name/address/port/user/known_hosts for ``host``: those
    of ``kmpops.config.Host`` if it has them; jump hops filled in from the host."""
    fields: dict[str, Any] = {
        "key_file": getattr(host, "key_file", None),
        "key_passphrase": getattr(host, "key_passphrase", None),
        "certificate": getattr(host, "certificate", None),
        "agent": bool(getattr(host, "agent", False)),
        "agent_socket": getattr(host, "agent_socket", None),
    }
    hops = []
    for index, hop in enumerate(getattr(host, "jump", None) or ()):
        own_key = hop.key_file is not None or hop.agent
        hops.append(
            Endpoint(
                name=f"{host.name}/jump[{index}] {hop.address}",
                address=hop.address,
                port=hop.port,
                user=hop.user or host.user,
                known_hosts=Path(hop.known_hosts or host.known_hosts),
                key_file=hop.key_file if own_key else fields["key_file"],
                key_passphrase=hop.key_passphrase if own_key else fields["key_passphrase"],
                certificate=hop.certificate if own_key else fields["certificate"],
                agent=hop.agent if own_key else fields["agent"],
                agent_socket=hop.agent_socket if own_key else fields["agent_socket"],
            )
        )
    fields["jump"] = tuple(hops)
    return fields


def _load_key(endpoint: Endpoint) -> paramiko.PKey | None:
    """The endpoint's key file (decrypted with its passphrase, its certificate attached), or
    None without a key file. Raises ConnectorError naming the file and the passphrase's
    reference (never its value)."""
    key_file = endpoint.key_file
    if key_file is None:
        return None
    passphrase: str | None = None
    if endpoint.key_passphrase is not None:
        from kmpops.secrets import resolve_secret  # the secret is read only now

        try:
            passphrase = resolve_secret(endpoint.key_passphrase)
        except KmpOpsError as exc:
            raise ConnectorError(f"SSH key file {key_file}: passphrase: {exc}") from None
    if passphrase is None:
        pkey = _load_private_key(key_file)
    else:
        ref = SecretRef.parse(endpoint.key_passphrase)  # str() shows a literal as stars
        try:
            pkey = paramiko.PKey.from_path(key_file, password=passphrase.encode())
        except FileNotFoundError as exc:
            raise ConnectorError(f"SSH key file {key_file} does not exist") from exc
        except PermissionError as exc:
            raise ConnectorError(f"SSH key file {key_file} is not readable") from exc
        except (paramiko.SSHException, ValueError, OSError, TypeError):
            # paramiko says "bad passphrase?" for both a wrong passphrase and a broken file
            raise ConnectorError(
                f"SSH key file {key_file} could not be decrypted with the passphrase from "
                f"{ref} (wrong passphrase, or not a private key)"
            ) from None
    certificate = endpoint.certificate
    beside = Path(f"{key_file}-cert.pub")
    if certificate is None and beside.is_file():
        certificate = beside  # OpenSSH's rule: a certificate next to the key is offered with it
    if certificate is not None:
        try:
            pkey.load_certificate(str(certificate))
        except FileNotFoundError as exc:
            raise ConnectorError(f"SSH certificate {certificate} does not exist") from exc
        except (ValueError, paramiko.SSHException, OSError) as exc:
            raise ConnectorError(
                f"SSH certificate {certificate} is not a certificate of the key {key_file}: {exc}"
            ) from exc
    return pkey


def own_key_fingerprints(host: Any, *, timeout: float = 5.0) -> set[str]:
    """The SHA256 fingerprints of the keys kmp-ops logs in with on ``host`` (a
    ``kmpops.config.Host``): its key file — from the private key, or, if that is encrypted
    and no passphrase resolves, from ``<key>.pub`` —, each jump hop's own key, and the
    agent's keys when ``agent`` is set. Never raises: a key that cannot be read is left out
    (the caller reports what it could not account for)."""
    endpoints = [SSHConnection.from_host(host).endpoint, *_host_connection_fields(host)["jump"]]
    found: set[str] = set()
    for endpoint in endpoints:
        if endpoint.key_file is not None:
            try:
                pkey = _load_key(Endpoint(**{**endpoint.__dict__, "certificate": None}))
                if pkey is not None:
                    found.add(pkey.fingerprint)
            except (ConnectorError, OSError, ValueError):
                public = Path(f"{endpoint.key_file}.pub")
                with contextlib.suppress(OSError, ValueError, IndexError, paramiko.SSHException):
                    key_type, b64 = public.read_text().split()[:2]
                    found.add(
                        paramiko.PKey.from_type_string(key_type, base64.b64decode(b64)).fingerprint
                    )
        if endpoint.agent:
            with contextlib.suppress(ConnectorError, OSError, paramiko.SSHException):
                agent, keys = _agent_keys(endpoint, timeout)
                try:
                    found.update(k.fingerprint for k in keys)
                finally:
                    agent.close()
    return found


class _SocketAgent(paramiko.agent.AgentSSH):
    """The keys of the ssh-agent listening on ``path`` (paramiko.Agent reads $SSH_AUTH_SOCK)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            self._connect(sock)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Close the connection to the agent."""
        self._close()


def _agent_keys(endpoint: Endpoint, timeout: float) -> tuple[Any, list[paramiko.PKey]]:
    """(agent, its keys) for ``endpoint.agent``; ConnectorError if no agent is reachable."""
    path = str(endpoint.agent_socket or os.environ.get("SSH_AUTH_SOCK") or "")
    if not path:
        raise ConnectorError(
            f"{endpoint.where}: agent: true but SSH_AUTH_SOCK is not set (no agent_socket)"
        )
    try:
        agent = _SocketAgent(path, timeout)
    except (OSError, paramiko.SSHException) as exc:
        raise ConnectorError(
            f"{endpoint.where}: cannot reach the ssh-agent at {path}: {exc}"
        ) from exc
    return agent, list(agent.get_keys())


class _HostKeyTable:
    """The pinned keys of a known_hosts file, looked up like ``paramiko.HostKeys`` did (exact
    names and hashed ``|1|salt|hash`` names; a later line for the same name and key type
    replaces an earlier one, as ``HostKeys.add``; a name's own lines before hashed ones), but
    indexed by name: paramiko's ``add`` and ``load`` scan every entry already read, so parsing
    a 500-host file cost 26 ms, once per connection (O(n^2) per deploy: the curve's bend at
    250+ hosts, bench/README.md "growth")."""

    def __init__(self) -> None:
        self._plain: dict[str, dict[str, tuple[int, paramiko.PKey]]] = {}
        self._hashed: list[tuple[int, str, paramiko.PKey]] = []
        self._count = 0

    def add(self, hostname: str, key: paramiko.PKey) -> None:
        """Pin ``key`` for ``hostname`` (a name or a hashed name)."""
        self._count += 1
        if hostname.startswith("|1|"):
            self._hashed.append((self._count, hostname, key))
        else:
            self._plain.setdefault(hostname, {})[key.get_name()] = (self._count, key)

    def lookup(self, hostname: str) -> dict[str, paramiko.PKey] | None:
        """Key type -> key pinned for ``hostname``, or None if no line names it."""
        found: dict[str, tuple[int, paramiko.PKey]] = dict(self._plain.get(hostname, {}))
        for order, pattern, key in self._hashed:
            if key.get_name() not in found and _matches(pattern, hostname):
                found[key.get_name()] = (order, key)
        if not found:
            return None
        return {name: key for name, (_, key) in sorted(found.items(), key=lambda i: i[1][0])}


@dataclass
class _KnownHosts:
    """A known_hosts file: pinned keys, ``@cert-authority`` lines and ``@revoked`` keys."""

    path: Path
    keys: _HostKeyTable
    authorities: list[tuple[str, paramiko.PKey]]
    revoked: list[paramiko.PKey]

    def authorities_for(self, hostname: str) -> list[paramiko.PKey]:
        """The CA keys whose patterns match ``hostname`` (as known_hosts names it)."""
        return [key for patterns, key in self.authorities if _matches(patterns, hostname)]


def _matches(patterns: str, hostname: str) -> bool:
    """OpenSSH host pattern matching: comma list, ``*``/``?`` wildcards, ``!`` negation,
    hashed (``|1|salt|hash``) entries."""

    matched = False
    for pattern in patterns.split(","):
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        if pattern.startswith("|1|"):
            salt_b64, _, digest_b64 = pattern[3:].partition("|")
            try:
                salt = base64.b64decode(salt_b64)
                hit = hmac.compare_digest(
                    base64.b64encode(hmac.new(salt, hostname.encode(), hashlib.sha1).digest()),
                    digest_b64.encode(),
                )
            except ValueError:
                hit = False
        else:
            # OpenSSH patterns know only * and ?; "[127.0.0.1]:2222" is literal, not a class.
            regex = "".join(
                ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()
            )
            hit = re.fullmatch(regex, hostname.lower()) is not None
        if hit and negate:
            return False
        matched = matched or hit
    return matched


#: How often an idle transport's reader thread wakes (paramiko's default is 0.1 s). Each wake
#: takes the GIL; with every host's connection kept open for a whole deploy, 500 transports at
#: 0.1 s spent ~20 CPU s of the control node's 50 on waking (bench/README.md, "growth": 500
#: hosts 85 s -> 67 s, client CPU 51 s -> 31 s). A keepalive (30 s) and the handshake's timeout
#: are checked on these wakes, so they are late by at most this much.
TRANSPORT_POLL_S = 1.0

#: parsed known_hosts files by (path, sha256 of their bytes): each connection reads its file
#: again (a key removed a moment ago is never trusted), parsing happens once per content
_KNOWN_HOSTS_CACHE: dict[tuple[str, str], _KnownHosts] = {}
_KNOWN_HOSTS_LOCK = threading.Lock()


def _read_known_hosts(path: Path) -> _KnownHosts:
    """Parse ``path`` (a missing file is empty); ConnectorError if it cannot be read.

    The file is read on every call; a content already parsed is not parsed again."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError as exc:
        raise ConnectorError(f"known_hosts file {path} is not readable") from exc
    cache_key = (str(path), hashlib.sha256(raw).hexdigest())
    with _KNOWN_HOSTS_LOCK:
        cached = _KNOWN_HOSTS_CACHE.get(cache_key)
    if cached is not None:
        return cached
    parsed = _parse_known_hosts(path, raw.decode("utf-8", errors="replace"))
    with _KNOWN_HOSTS_LOCK:
        if len(_KNOWN_HOSTS_CACHE) >= 64:  # a few files per process; never grows unbounded
            _KNOWN_HOSTS_CACHE.clear()
        _KNOWN_HOSTS_CACHE[cache_key] = parsed
    return parsed


def _parse_known_hosts(path: Path, text: str) -> _KnownHosts:
    """The pinned keys, CAs and revoked keys of known_hosts ``text`` (read from ``path``);
    ConnectorError naming the line of an unreadable CA or revoked key."""
    keys = _HostKeyTable()
    authorities: list[tuple[str, paramiko.PKey]] = []
    revoked: list[paramiko.PKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            fields = line.split()
            if len(fields) < 4 or fields[0] not in ("@cert-authority", "@revoked"):
                continue  # OpenSSH ignores what it does not understand, so do we
            try:
                key = paramiko.PKey.from_type_string(fields[2], base64.b64decode(fields[3]))
            except (ValueError, paramiko.SSHException) as exc:
                raise ConnectorError(f"known_hosts file {path}:{number}: bad key: {exc}") from exc
            if fields[0] == "@cert-authority":
                authorities.append((fields[1], key))
            else:
                revoked.append(key)
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except (paramiko.SSHException, ValueError):
            continue
        if entry is not None:
            for host in entry.hostnames:
                keys.add(host, entry.key)
    return _KnownHosts(path, keys, authorities, revoked)


@dataclass(frozen=True)
class HostCertificate:
    """The fields of an OpenSSH host certificate that decide whether to trust it."""

    key_id: str
    serial: int
    cert_type: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: bytes
    signature_key: bytes
    signed: bytes
    signature: bytes


# Public-key fields between the nonce and the serial (PROTOCOL.certkeys), all length-prefixed.
_CERT_KEY_FIELDS = {
    "ssh-ed25519-cert-v01@openssh.com": 1,
    "ssh-rsa-cert-v01@openssh.com": 2,
    "rsa-sha2-256-cert-v01@openssh.com": 2,
    "rsa-sha2-512-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
}


def parse_certificate(blob: bytes) -> HostCertificate:
    """The fields of an OpenSSH certificate blob; ValueError if it is not one we can read."""
    msg = paramiko.Message(blob)
    cert_type_name = msg.get_text()
    if cert_type_name not in _CERT_KEY_FIELDS:
        raise ValueError(f"unsupported certificate type {cert_type_name}")
    msg.get_string()  # nonce
    for _ in range(_CERT_KEY_FIELDS[cert_type_name]):
        msg.get_string()
    serial = msg.get_int64()
    cert_type = msg.get_int()
    key_id = msg.get_text()
    principals_msg = paramiko.Message(msg.get_string())
    principals = []
    while principals_msg.get_remainder():
        principals.append(principals_msg.get_text())
    valid_after = msg.get_int64()
    valid_before = msg.get_int64()
    critical = msg.get_string()
    msg.get_string()  # extensions (none are defined for host certificates)
    msg.get_string()  # reserved
    signature_key = msg.get_string()
    signed = blob[: msg.packet.tell()]
    signature = msg.get_string()
    if not signature:
        raise ValueError("the certificate has no signature")
    return HostCertificate(
        key_id=key_id,
        serial=serial,
        cert_type=cert_type,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=critical,
        signature_key=signature_key,
        signed=signed,
        signature=signature,
    )


def _fingerprint_of_blob(key_type: str, blob: bytes) -> str:
    try:
        return paramiko.PKey.from_type_string(key_type, blob).fingerprint
    except (ValueError, paramiko.SSHException):
        return f"{key_type} (unreadable)"


def check_host_certificate(
    server_key: paramiko.PKey,
    authorities: Sequence[paramiko.PKey],
    *,
    principal: str,
    where: str,
    now: float | None = None,
) -> HostCertificate:
    """Verify the host certificate the server presented: a host certificate (not a user one),
    signed by one of ``authorities`` (the signature checked over the certificate), naming
    ``principal``, valid now, without critical options. Returns the certificate; raises
    HostKeyRejected naming ``where`` and what was wrong."""
    blob = server_key.public_blob
    if blob is None:
        raise HostKeyRejected(f"{where}: the host presented no certificate")
    try:
        cert = parse_certificate(blob.key_blob)
    except (ValueError, paramiko.SSHException) as exc:
        raise HostKeyRejected(f"{where}: unreadable host certificate: {exc}") from None
    if cert.cert_type != 2:
        raise HostKeyRejected(f"{where}: the certificate {cert.key_id!r} is not a host certificate")
    ca_type = paramiko.Message(cert.signature_key).get_text()
    ca = next((key for key in authorities if key.asbytes() == cert.signature_key), None)
    if ca is None:
        raise HostKeyRejected(
            f"{where}: host certificate {cert.key_id!r} is signed by CA {ca_type} "
            f"{_fingerprint_of_blob(ca_type, cert.signature_key)}, which is not a "
            "@cert-authority for this host in known_hosts"
        )
    if not ca.verify_ssh_sig(cert.signed, paramiko.Message(cert.signature)):
        raise HostKeyRejected(
            f"{where}: host certificate {cert.key_id!r}: the CA signature does not verify"
        )
    if principal not in cert.principals:
        raise HostKeyRejected(
            f"{where}: host certificate {cert.key_id!r} is for "
            f"{', '.join(cert.principals) or 'no principal'}, not {principal}"
        )
    moment = time.time() if now is None else now
    if not cert.valid_after <= moment < cert.valid_before:
        raise HostKeyRejected(
            f"{where}: host certificate {cert.key_id!r} is not valid now (valid "
            f"{cert.valid_after} to {cert.valid_before}, epoch seconds)"
        )
    if cert.critical_options:
        raise HostKeyRejected(
            f"{where}: host certificate {cert.key_id!r} has critical options (none are defined "
            "for host certificates)"
        )
    return cert


def _verify_server_key(
    endpoint: Endpoint,
    server_key: paramiko.PKey,
    known: _KnownHosts,
    hostname: str,
    allow_unknown_hosts: bool,
) -> None:
    """Accept the server's key if pinned in known_hosts or certified by a known CA; raise
    HostKeyRejected otherwise (trust on first use only for a plain key with
    ``allow_unknown_hosts``, never for a certificate or a changed key)."""
    where = endpoint.where
    plain = server_key.asbytes()
    if any(r.asbytes() == plain for r in known.revoked):
        raise HostKeyRejected(f"{where}: host key {server_key.fingerprint} is @revoked")
    ours = known.keys.lookup(hostname)
    if ours:
        expected = ours.get(server_key.get_name())
        if expected is None or expected.asbytes() != plain:
            shown = expected or next(iter(ours.values()))
            raise HostKeyRejected(
                f"{where}: host key changed: {known.path} has "
                f"{shown.get_name()} {shown.fingerprint}, the host offered "
                f"{server_key.get_name()} {server_key.fingerprint}"
            ) from paramiko.BadHostKeyException(hostname, server_key, shown)
        return
    if server_key.public_blob is not None:
        try:
            cert = parse_certificate(server_key.public_blob.key_blob)
        except (ValueError, paramiko.SSHException) as exc:
            raise HostKeyRejected(f"{where}: unreadable host certificate: {exc}") from None
        if any(r.asbytes() == cert.signature_key for r in known.revoked):
            raise HostKeyRejected(f"{where}: the CA of its host certificate is @revoked")
        check_host_certificate(
            server_key,
            known.authorities_for(hostname),
            principal=endpoint.address,
            where=where,
        )
        return
    if not allow_unknown_hosts:
        missing = "" if known.path.exists() else " (file does not exist)"
        raise HostKeyRejected(
            f"{where}: host key not in {known.path}{missing}; offered "
            f"{server_key.get_name()} {server_key.fingerprint}"
        )
    # Trust on first use (AutoAddPolicy): remember the key so later connections verify it.
    with _known_hosts_lock:
        known.path.parent.mkdir(parents=True, exist_ok=True)
        with open(known.path, "a") as fh:
            fh.write(f"{hostname} {server_key.get_name()} {server_key.get_base64()}\n")


def _open_socket(
    endpoint: Endpoint, via: paramiko.Transport | None, timeout: float
) -> socket.socket | paramiko.Channel:
    """A TCP connection to the endpoint, direct or through the previous hop's transport (a
    ``direct-tcpip`` channel, as ProxyJump does)."""
    where = endpoint.where
    if via is not None:
        try:
            return via.open_channel(
                "direct-tcpip", (endpoint.address, endpoint.port), ("127.0.0.1", 0), timeout=timeout
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachable(f"{where}: the jump host refused to forward: {exc}") from exc
    try:
        sock = socket.create_connection((endpoint.address, endpoint.port), timeout)
    except TimeoutError as exc:
        raise HostUnreachable(f"{where}: TCP connect timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise HostUnreachable(f"{where}: {exc.strerror or exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _open_endpoint(
    endpoint: Endpoint,
    via: paramiko.Transport | None,
    timeout: float,
    allow_unknown_hosts: bool,
) -> paramiko.Transport:
    """An authenticated transport to ``endpoint`` (through ``via`` if given): host key or host
    certificate checked, then the key file (with its certificate), then the agent's keys
    offered. Raises HostUnreachable, HostKeyRejected, AuthenticationFailed, ConnectorError."""
    pkey = _load_key(endpoint)
    known = _read_known_hosts(endpoint.known_hosts)
    hostname = _known_hosts_name(endpoint.address, endpoint.port)
    ours = known.keys.lookup(hostname)
    authorities = known.authorities_for(hostname)
    sock = _open_socket(endpoint, via, timeout)
    transport = paramiko.Transport(sock)
    # How often the transport's thread wakes while nothing arrives: paramiko sets the socket's
    # timeout to 0.1 s in Transport() and its thread polls on it. Data wakes the thread at once
    # whatever the value; so does _close_transport's shutdown.
    sock.settimeout(TRANSPORT_POLL_S)
    agent = None
    try:
        options = transport.get_security_options()
        if ours is not None and len(ours):
            first = next(iter(ours))
            options.key_types = [first, *(k for k in options.key_types if k != first)]
        elif authorities:
            # A CA vouches for this host: ask for its certificate first.
            plain = [k for k in options.key_types if "-cert-" not in k]
            certs = [f"{k}-cert-v01@openssh.com" for k in plain]
            certs = [k for k in certs if k in paramiko.Transport._key_info]
            options.key_types = [*certs, *plain]
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachable(f"{endpoint.where}: SSH handshake failed: {exc}") from exc
        _verify_server_key(
            endpoint, transport.get_remote_server_key(), known, hostname, allow_unknown_hosts
        )
        transport.auth_timeout = timeout
        offered: list[tuple[str, paramiko.PKey]] = []
        if pkey is not None:
            label = f"key {endpoint.key_file}"
            if pkey.public_blob is not None:
                label += " and its certificate"
            offered.append((label, pkey))
        if endpoint.agent:
            agent, agent_keys = _agent_keys(endpoint, timeout)
            offered += [(f"agent key {k.fingerprint}", k) for k in agent_keys]
        if not offered:
            raise AuthenticationFailed(f"{endpoint.where}: no key to offer (the agent has none)")
        for _label, key in offered:
            try:
                transport.auth_publickey(endpoint.user, key)
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise HostUnreachable(
                    f"{endpoint.where}: connection lost during auth: {exc}"
                ) from exc
            if transport.is_authenticated():
                break
        if not transport.is_authenticated():
            tried = "; ".join(label for label, _ in offered)
            raise AuthenticationFailed(
                f"{endpoint.where}: user {endpoint.user} was refused ({tried})"
            )
    except BaseException:
        _close_transport(transport)
        raise
    finally:
        if agent is not None:
            agent.close()  # the keys have signed; the agent is not needed any more
    transport.set_keepalive(30)
    return transport


def _close_transport(transport: paramiko.Transport) -> None:
    """Close ``transport`` and end its reader thread now; never raises.

    The socket is shut down first. paramiko's close() alone closes it under the thread's recv:
    a live peer's reset then wakes the thread (~40 ms on loopback, logged by paramiko as a
    "Connection reset by peer" error), a silent one (a partitioned network) does not until
    the thread's next poll (TRANSPORT_POLL_S)."""
    with contextlib.suppress(Exception):
        transport.sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        transport.close()


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
        key_file: Path | None,
        known_hosts: Path,
        connect_timeout: float = 10,
        allow_unknown_hosts: bool = False,
        key_passphrase: SecretRef | str | None = None,
        certificate: Path | None = None,
        agent: bool = False,
        agent_socket: Path | None = None,
        jump: Sequence[Endpoint] = (),
        sftp_timeout: float = 60,
    ) -> None:
        self.name = name
        self.address = address
        self.port = int(port)
        self.user = user
        self.key_file = Path(key_file) if key_file is not None else None
        self.known_hosts = Path(known_hosts)
        self.connect_timeout = connect_timeout
        self.allow_unknown_hosts = allow_unknown_hosts
        self.endpoint = Endpoint(
            name=name,
            address=address,
            port=int(port),
            user=user,
            key_file=self.key_file,
            known_hosts=self.known_hosts,
            key_passphrase=key_passphrase,
            certificate=Path(certificate) if certificate is not None else None,
            agent=agent,
            agent_socket=Path(agent_socket) if agent_socket is not None else None,
        )
        self.jump = tuple(jump)
        self._hops: list[paramiko.Transport] = []
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
        The connection fields of ``kmpops.config.Host`` beyond those (``key_passphrase``,
        ``certificate``, ``agent``, ``agent_socket``, ``jump``) are read when the host has them;
        a jump hop's missing user, credentials and known_hosts are the host's own.
        """
        fields = _host_connection_fields(host)
        fields.update(options)
        return cls(
            name=host.name,
            address=host.address,
            port=host.port,
            user=host.user,
            known_hosts=host.known_hosts,
            **fields,
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
        """Open the transport through every jump hop in turn (each hop's host key checked, each
        authenticated), then to the host; on any failure close what was opened."""
        hops: list[paramiko.Transport] = []
        try:
            previous: paramiko.Transport | None = None
            for hop in self.jump:
                previous = _open_endpoint(
                    hop, previous, self.connect_timeout, self.allow_unknown_hosts
                )
                hops.append(previous)
            transport = _open_endpoint(
                self.endpoint, previous, self.connect_timeout, self.allow_unknown_hosts
            )
        except BaseException:
            for hop_transport in reversed(hops):
                _close_transport(hop_transport)
            raise
        self._hops = hops
        return transport

    def _drop(self) -> None:
        sftp, transport = self._sftp, self._transport
        self._sftp = self._transport = None
        hops, self._hops = self._hops, []
        if sftp is not None:
            with contextlib.suppress(Exception):
                sftp.close()
        if transport is not None:
            _close_transport(transport)
        for hop in reversed(hops):  # the bastions after the host they carried
            _close_transport(hop)

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
        become: Become | None = None,
    ) -> CommandResult:
        """Run ``command`` on the host and return its result.

        With ``become`` (``kmpops.become.Become``) the command, which must then be a sequence of
        words, runs as ``sudo -n -u USER -- WORDS``: sudo never prompts (``-n``) and the session
        has no terminal (no pty is ever requested), so a command no sudo rule allows fails at
        once with PrivilegeRefused naming the host, the command and the user. ``env`` does not
        reach a become command (sudo resets the environment).

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
        if become is not None:
            if isinstance(command, str):
                raise UnsafeValueError("a become command must be a sequence of words")
            asked = shellsafe.join(command)
            result = self.run(sudo_argv(command, become), timeout=timeout, stdin=stdin, env=env)
            why = refusal(result.stderr) if result.exit_status != 0 else None
            if why is not None:
                raise refused_error(self.name, become.user, asked, why)
            return result.check() if check else result
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

    def _ensure_sftp(self, purpose: str = "") -> paramiko.SFTPClient:
        """The connection's SFTP session, opened (bounded by ``sftp_timeout``) when needed.

        ``purpose`` ("read of /etc/x") names what the session was opened for in errors. Raises
        CommandTimeout when the server does not answer the negotiation, HostUnreachable when
        the subsystem cannot be started.
        """
        transport = self._ensure_transport()
        where = f"{self._where}: {purpose}:" if purpose else f"{self._where}:"
        channel: paramiko.Channel | None = None
        with self._lock:
            if self._sftp is not None and self._sftp.get_channel().get_transport() is transport:
                return self._sftp
            # paramiko's from_transport() would wait for the server's version packet forever
            # (a stopped sftp-server); the channel gets its timeout before the negotiation, so
            # opening is bounded like every request after it.
            try:
                channel = transport.open_session(timeout=self.sftp_timeout)
                channel.settimeout(self.sftp_timeout)
                channel.invoke_subsystem("sftp")
                self._sftp = paramiko.SFTPClient(channel)
            except TimeoutError as exc:
                if channel is not None:
                    channel.close()
                raise CommandTimeout(
                    f"{where} opening SFTP timed out after {self.sftp_timeout:g}s "
                    "(the SFTP server did not answer)"
                ) from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if channel is not None:
                    channel.close()
                raise HostUnreachable(f"{where} cannot open SFTP: {exc}") from exc
            return self._sftp

    @contextlib.contextmanager
    def _sftp_errors(self, what: str, remote: str) -> Iterator[paramiko.SFTPClient]:
        sftp = self._ensure_sftp(f"{what} {remote}")
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

    def host(self, name: str) -> Any:
        """The host model ``name`` was built from; raises NotFound for an unknown host."""
        try:
            return self._slots[name].host
        except KeyError:
            raise NotFound(f"host {name} is not in this fleet") from None

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[SSHConnection]:
        """The connection to host ``name``, held for the block (one user at a time per host,
        like a ``run()`` step); raises NotFound for an unknown host."""
        self.host(name)
        slot = self._slots[name]
        with slot.lock:
            yield self.connection(name)

    def warm(self, hosts: Sequence[str] | None = None) -> None:
        """Start connecting to ``hosts`` (default: all) in the background and return at once,
        so the handshakes overlap whatever the caller does next; a step on a host waits for
        its handshake (one user at a time per host). A host that cannot be reached is not
        reported here: its first step connects again and says why. Only inside ``with fleet``
        (otherwise nothing happens); raises NotFound for a name not in the fleet."""
        names = list(self._slots) if hosts is None else list(hosts)
        for name in names:
            self.host(name)
        pool = self._pool
        if pool is None:
            return
        for name in names:
            pool.submit(self._run_one, name, lambda n: self.connection(n).connect())

    def run_on(
        self, step: Callable[[Any, SSHConnection], T], *, hosts: Sequence[str] | None = None
    ) -> dict[str, HostOutcome[T]]:
        """As :meth:`run`, with ``step(host, connection)``: the host model too."""
        return self._run_many(
            hosts, lambda name: step(self._slots[name].host, self.connection(name))
        )

    def run(
        self, step: Callable[[SSHConnection], T], *, hosts: Sequence[str] | None = None
    ) -> dict[str, HostOutcome[T]]:
        """Call ``step(connection)`` once per host (all, or ``hosts``) and collect outcomes.

        Returns ``{host name: HostOutcome}`` in the order asked. Never raises for a host's
        failure (connect errors included); raises NotFound for a name not in the fleet. Each
        step runs in a copy of the caller's context variables (a workflow engine's run context,
        a logger's fields reach it).
        """
        return self._run_many(hosts, lambda name: step(self.connection(name)))

    def _run_many(
        self, hosts: Sequence[str] | None, call: Callable[[str], T]
    ) -> dict[str, HostOutcome[T]]:
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
            futures = {
                name: pool.submit(contextvars.copy_context().run, self._run_one, name, call)
                for name in names
            }
            return {name: future.result() for name, future in futures.items()}
        finally:
            if own_pool:
                pool.shutdown(wait=True)
                if not self._entered:
                    self.close()

    def _run_one(self, name: str, call: Callable[[str], T]) -> HostOutcome[T]:
        started = time.monotonic()
        slot = self._slots[name]
        with slot.lock:
            try:
                value = call(name)
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
