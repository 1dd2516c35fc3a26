"""known_hosts as kmp-ops reads it: indexed by name (500 lines parse once, not once per
connection), re-read on every connection so a key removed a moment ago is not trusted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

import paramiko

from kmpops.connectors.ssh import _read_known_hosts


def _key() -> paramiko.PKey:
    """A new host's public key (nothing written anywhere)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    line = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    kind, blob = line.decode().split()
    return paramiko.PKey.from_type_string(kind, base64.b64decode(blob))


def _line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def _hashed(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_names_hashed_names_and_the_last_line_of_a_name(tmp_path: Path) -> None:
    a, b, c = _key(), _key(), _key()
    path = tmp_path / "known_hosts"
    path.write_text(
        _line("[127.0.0.1]:2201", a)
        + _line(_hashed("[127.0.0.1]:2202"), b)
        + _line("[127.0.0.1]:2201", c)
    )
    known = _read_known_hosts(path)
    assert known.keys.lookup("[127.0.0.1]:2201") == {"ssh-ed25519": c}  # as HostKeys.add did
    assert known.keys.lookup("[127.0.0.1]:2202") == {"ssh-ed25519": b}
    assert known.keys.lookup("[127.0.0.1]:2203") is None


def test_a_removed_key_is_not_trusted_on_the_next_read(tmp_path: Path) -> None:
    keys = [_key() for _ in range(3)]
    path = tmp_path / "known_hosts"
    path.write_text("".join(_line(f"[127.0.0.1]:{2200 + i}", k) for i, k in enumerate(keys)))
    assert _read_known_hosts(path).keys.lookup("[127.0.0.1]:2201") is not None
    stat = path.stat()
    # the same size and the same mtime: only the content tells the files apart
    path.write_text(
        _line("[127.0.0.1]:2200", keys[0])
        + _line("[127.0.0.1]:2209", keys[1])
        + _line("[127.0.0.1]:2202", keys[2])
    )
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert _read_known_hosts(path).keys.lookup("[127.0.0.1]:2201") is None
