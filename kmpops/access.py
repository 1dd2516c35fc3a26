"""SSH access on hosts: authorized_keys parsing and editing, auth-method probes, new key pairs.

``AuthorizedKey`` is one public key line (options, type, base64 blob, comment) identified by its
OpenSSH ``SHA256:`` fingerprint. Text transforms (``add_key``, ``remove_keys``) are pure; the
file is read with :func:`read_authorized_keys` and replaced atomically (temp file + rename, mode
0600) with :func:`write_authorized_keys`, so sshd never reads half a file. ``probe_host`` opens
an SSH transport without authenticating and reports the host key (checked against known_hosts)
and the authentication methods the server offers: the daemon's effective configuration as any
client sees it. No private key material is ever returned in text that could be logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kmpops.errors import HostUnreachable, NotFound
from kmpops.shellsafe import validate_path

__all__ = [
    "AuthProbe",
    "AuthorizedKey",
    "add_key",
    "authorized_keys_path",
    "fingerprint_of_key_file",
    "key_options",
    "new_ed25519_keypair",
    "parse_authorized_keys",
    "parse_offered_key",
    "parse_public_key",
    "probe_host",
    "read_authorized_keys",
    "remove_keys",
    "write_authorized_keys",
    "write_private_key",
]

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,3}$")
# What a comment of an offered key may hold: no shell, no quotes, no control characters.
_SAFE_COMMENT = re.compile(r"[A-Za-z0-9@._+:,=/-]+(?: [A-Za-z0-9@._+:,=/-]+)*")
_MAX_COMMENT = 128
_OPTION = re.compile(r'[A-Za-z][A-Za-z0-9-]{0,63}(="[^"\\\n\r\x00]{0,512}")?')


@dataclass(frozen=True)
class AuthorizedKey:
    """One public key: ``[options] type base64 [comment]``."""

    key_type: str
    key_b64: str
    comment: str = ""
    options: str = ""

    @property
    def fingerprint(self) -> str:
        """The OpenSSH fingerprint (``SHA256:`` + unpadded base64 of the blob's sha256)."""
        digest = hashlib.sha256(base64.b64decode(self.key_b64)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self) -> str:
        """The key as one authorized_keys line."""
        words = [self.options] if self.options else []
        words += [self.key_type, self.key_b64]
        if self.comment:
            words.append(self.comment)
        return " ".join(words)

    def public_line(self) -> str:
        """``type base64 comment`` (without options)."""
        return " ".join(w for w in (self.key_type, self.key_b64, self.comment) if w)


def _split_options(line: str) -> tuple[str, str]:
    """Split a leading options field (may hold quoted spaces) from the rest of the line."""
    if line.split(" ", 1)[0] in KEY_TYPES:
        return "", line
    in_quote = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_quote = not in_quote
        elif ch in " \t" and not in_quote:
            return line[:i], line[i + 1 :].lstrip()
    return line, ""


def parse_public_key(line: str) -> AuthorizedKey:
    """Parse one key line (options allowed). Raises ValueError for anything else."""
    text = line.strip()
    if not text or text.startswith("#") or "\n" in text or "\x00" in text:
        raise ValueError("not a public key line")
    options, rest = _split_options(text)
    words = rest.split(None, 2)
    if len(words) < 2 or words[0] not in KEY_TYPES:
        raise ValueError("not a public key line (unknown key type)")
    key_type, key_b64 = words[0], words[1]
    if not _B64.match(key_b64):
        raise ValueError("public key blob is not base64")
    try:
        blob = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("public key blob is not base64") from exc
    name_len = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + name_len].decode("ascii", "replace") != key_type:
        raise ValueError("public key blob does not match its key type")
    comment = words[2].strip() if len(words) > 2 else ""
    return AuthorizedKey(key_type, key_b64, comment, options)


def key_options(options: str) -> list[str]:
    """The option words of an authorized_keys options field (split on commas outside quotes).

    Raises ValueError naming a word that is not ``name`` or ``name="value"`` (no quotes,
    backslashes or control characters inside the value).
    """
    words: list[str] = []
    current, in_quote = "", False
    for ch in options:
        if ch == '"':
            in_quote = not in_quote
        if ch == "," and not in_quote:
            words.append(current)
            current = ""
        else:
            current += ch
    words.append(current)
    for word in words:
        if not _OPTION.fullmatch(word):
            raise ValueError(f"{word!r} is not a key option")
    return words


def parse_offered_key(line: str, *, allowed_options: Iterable[str] | None = ()) -> AuthorizedKey:
    """Parse a public key someone asks to have written: ``[options] type base64 [comment]``.

    Stricter than :func:`parse_public_key` (which reads whatever a host's file holds): one
    line; a known key type; a base64 blob that paramiko loads as a key of that type; a comment
    of safe characters (letters, digits, ``@._+:,=/-`` and single spaces, at most 128); and
    options only from ``allowed_options`` (exact words as in ops.yaml ``access.key_options``;
    ``None`` checks their syntax only, for a form validator that has no config). Raises
    ValueError naming what is wrong; never returns a key that could write anything but a key.
    """
    if not isinstance(line, str):
        raise ValueError("a public key must be text")
    if any(ch in line for ch in "\n\r\x00"):
        raise ValueError("a public key is one line (it contains a newline or NUL)")
    text = line.strip()
    options, rest = _split_options(text)
    if options:
        try:
            words = key_options(options)
        except ValueError as exc:
            raise ValueError(f"public key options field {options!r}: {exc}") from None
        if allowed_options is not None:
            allowed = set(allowed_options)
            refused = [w for w in words if w not in allowed]
            if refused:
                listed = ", ".join(sorted(allowed)) or "none"
                raise ValueError(
                    f"public key option(s) {', '.join(refused)} not allowed "
                    f"(ops.yaml access.key_options allows: {listed})"
                )
    parts = rest.split(" ", 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        known = ", ".join(KEY_TYPES)
        raise ValueError(f"public key must start with a key type ({known}), got {rest[:40]!r}")
    key_type, key_b64 = parts[0], parts[1]
    comment = parts[2] if len(parts) > 2 else ""
    if comment and (len(comment) > _MAX_COMMENT or not _SAFE_COMMENT.fullmatch(comment)):
        raise ValueError(
            f"public key comment {comment[:40]!r} has characters outside letters, digits, "
            f"'@._+:,=/-' and single spaces (or is longer than {_MAX_COMMENT})"
        )
    try:
        blob = base64.b64decode(key_b64, validate=True) if _B64.match(key_b64) else b""
    except (binascii.Error, ValueError):
        blob = b""
    if not blob:
        raise ValueError("public key blob is not base64")
    name_len = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + name_len].decode("ascii", "replace") != key_type:
        raise ValueError(f"public key blob does not match its key type {key_type}")
    fields = _wire_fields(blob)
    if fields is None or len(fields) != _KEY_FIELDS[key_type]:
        raise ValueError(f"public key blob is not a valid {key_type} key (wrong structure)")
    if key_type.endswith("ssh-ed25519") and len(fields[1]) != 32:
        raise ValueError(f"public key blob is not a valid {key_type} key (key is not 32 bytes)")
    if not key_type.startswith("sk-"):
        try:
            paramiko.PKey.from_type_string(key_type, blob)
        except Exception as exc:  # paramiko raises several types for a bad blob
            raise ValueError(f"public key blob is not a valid {key_type} key ({exc})") from None
    return AuthorizedKey(key_type, key_b64, comment, options)


# Length-prefixed fields (type name included) of each key type's public blob (RFC 4253/5656,
# OpenSSH PROTOCOL.u2f).
_KEY_FIELDS = {
    "ssh-ed25519": 2,
    "ssh-rsa": 3,
    "ecdsa-sha2-nistp256": 3,
    "ecdsa-sha2-nistp384": 3,
    "ecdsa-sha2-nistp521": 3,
    "sk-ssh-ed25519@openssh.com": 3,
    "sk-ecdsa-sha2-nistp256@openssh.com": 4,
}


def _wire_fields(blob: bytes) -> list[bytes] | None:
    """The SSH wire strings a blob is made of, or None if a length runs past the end."""
    fields: list[bytes] = []
    at = 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        size = int.from_bytes(blob[at : at + 4], "big")
        at += 4
        if at + size > len(blob):
            return None
        fields.append(blob[at : at + size])
        at += size
    return fields


def parse_authorized_keys(text: str) -> list[AuthorizedKey]:
    """Every valid key line of an authorized_keys file (comments, blanks, junk skipped)."""
    keys = []
    for line in text.splitlines():
        try:
            keys.append(parse_public_key(line))
        except ValueError:
            continue
    return keys


def add_key(text: str, key: AuthorizedKey) -> str:
    """``text`` with ``key`` appended; unchanged if a key with that blob is already there."""
    if any(k.key_b64 == key.key_b64 for k in parse_authorized_keys(text)):
        return text
    body = text if not text or text.endswith("\n") else text + "\n"
    return body + key.line() + "\n"


def remove_keys(text: str, fingerprints: Iterable[str]) -> str:
    """``text`` without the key lines whose fingerprint is in ``fingerprints`` (others kept)."""
    drop = set(fingerprints)
    kept = []
    for line in text.splitlines():
        try:
            if parse_public_key(line).fingerprint in drop:
                continue
        except ValueError:
            pass
        kept.append(line)
    return "\n".join(kept) + ("\n" if kept else "")


class _Connection(Protocol):
    name: str

    def read_bytes(self, remote: str) -> bytes: ...
    def put_bytes(self, data: bytes, remote: str, *, mode: int | None = None) -> int: ...
    def run(self, command: Any, **kwargs: Any) -> Any: ...


class _HostVars(Protocol):
    @property
    def vars(self) -> dict[str, str | int]: ...


def authorized_keys_path(host: _HostVars, template: str | None = None) -> str:
    """Where a host's authorized_keys is.

    Both come from ops.yaml, never from a flow parameter: the host var ``authorized_keys``
    wins; then ``template`` (ops.yaml ``access.authorized_keys``, ``{root}``-style placeholders
    from host vars); then ``{root}/etc/authorized_keys`` when the host has a ``root`` var (the
    local stack's sshd); else ``.ssh/authorized_keys`` (relative to the login's HOME).
    Raises UnsafeValueError for a path with ``..`` or unsafe characters, KeyError for an
    unknown placeholder.
    """
    values = {k: str(v) for k, v in host.vars.items()}
    if "authorized_keys" in values:
        path = values["authorized_keys"]
    elif template:
        path = template.format(**values)
    elif "root" in values:
        path = f"{values['root']}/etc/authorized_keys"
    else:
        path = ".ssh/authorized_keys"
    return validate_path(path, what="authorized_keys path")


def read_authorized_keys(conn: _Connection, path: str) -> str:
    """The authorized_keys text on the host ('' if the file does not exist)."""
    try:
        return conn.read_bytes(path).decode("utf-8", errors="replace")
    except NotFound:
        return ""


def write_authorized_keys(conn: _Connection, path: str, text: str) -> None:
    """Replace the host's authorized_keys atomically (temp name + rename, mode 0600)."""
    conn.put_bytes(text.encode(), path, mode=0o600)


@dataclass(frozen=True)
class AuthProbe:
    """What an unauthenticated client learns from a host."""

    host: str
    host_key_type: str
    host_key_fingerprint: str
    pinned: bool
    pin_detail: str
    auth_methods: tuple[str, ...]
    none_auth_accepted: bool

    @property
    def key_only(self) -> bool:
        """True when the server offers nothing but public-key authentication."""
        return not self.none_auth_accepted and set(self.auth_methods) <= {"publickey"}


def _pinned(known_hosts: Path, address: str, port: int, key: paramiko.PKey) -> tuple[bool, str]:
    host_keys = paramiko.HostKeys()
    try:
        host_keys.load(str(known_hosts))
    except FileNotFoundError:
        return False, f"{known_hosts} does not exist"
    name = address if port == 22 else f"[{address}]:{port}"
    ours = host_keys.lookup(name)
    if not ours:
        return False, f"no entry for {name} in {known_hosts}"
    expected = ours.get(key.get_name())
    if expected is None or expected != key:
        return False, f"{known_hosts} pins another key for {name}"
    return True, f"{name} pinned in {known_hosts}"


def probe_host(
    *, name: str, address: str, port: int, user: str, known_hosts: Path, timeout: float = 10
) -> AuthProbe:
    """Handshake with a host and ask which auth methods it accepts (``none`` auth attempt).

    Nothing is authenticated and no secret is sent. Raises HostUnreachable when the TCP
    connection or handshake fails.
    """
    try:
        sock = socket.create_connection((address, port), timeout)
    except OSError as exc:
        raise HostUnreachable(f"host {name} ({address}:{port}): {exc}") from exc
    transport = paramiko.Transport(sock)
    try:
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachable(f"host {name}: SSH handshake failed: {exc}") from exc
        key = transport.get_remote_server_key()
        pinned, detail = _pinned(Path(known_hosts), address, port, key)
        none_ok = False
        methods: tuple[str, ...] = ()
        try:
            transport.auth_none(user)
            none_ok = True
        except paramiko.BadAuthenticationType as exc:
            methods = tuple(sorted(exc.allowed_types))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachable(f"host {name}: connection lost during probe: {exc}") from exc
        return AuthProbe(
            host=name,
            host_key_type=key.get_name(),
            host_key_fingerprint=key.fingerprint,
            pinned=pinned,
            pin_detail=detail,
            auth_methods=methods,
            none_auth_accepted=none_ok,
        )
    finally:
        transport.close()


def new_ed25519_keypair(comment: str) -> tuple[bytes, AuthorizedKey]:
    """A new ed25519 key: (private key in OpenSSH PEM, public key). Keep the bytes secret."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, parse_public_key(f"{public.decode()} {comment}".strip())


def write_private_key(path: Path, private: bytes, public: AuthorizedKey) -> None:
    """Write a private key (mode 0600) and its ``.pub`` atomically (temp + rename)."""
    from kmpops.secrets import write_secret_file

    path = Path(path)
    pub_tmp = path.with_name(f".{path.name}.pub.kmpops.tmp")
    pub_tmp.write_text(public.public_line() + "\n")
    os.replace(pub_tmp, path.with_name(path.name + ".pub"))
    write_secret_file(path, private)


def fingerprint_of_key_file(private_key: Path) -> str:
    """The SHA256 fingerprint of a private key file's public half (read from the key itself)."""
    pkey = paramiko.PKey.from_path(private_key)
    return "SHA256:" + base64.b64encode(hashlib.sha256(pkey.asbytes()).digest()).decode().rstrip(
        "="
    )
