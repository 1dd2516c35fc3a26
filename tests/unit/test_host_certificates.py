"""Host certificates checked against known_hosts CAs (kmpops.connectors.ssh), on certificates
made by the real ``ssh-keygen -s``: a case table of what is accepted and what is refused."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import paramiko
import pytest

from kmpops.connectors.ssh import _matches, check_host_certificate, parse_certificate
from kmpops.errors import HostKeyRejected
from kmpops.stack.sshd import new_key_pair, sign_key

NOW = 1_900_000_000  # 2030-03-17, inside the "always" and explicit windows below


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    for name in ("ca", "other_ca", "host"):
        new_key_pair(root / name, name)
    return root


def certified(keys: Path, name: str, *, host: bool = True, principals=("10.0.0.1",), **kw):
    """The host key loaded with a certificate signed as asked (``name`` keeps files apart)."""
    public = keys / f"{name}.pub"
    public.write_text((keys / "host.pub").read_text())
    cert = sign_key(
        keys / kw.pop("ca", "ca"),
        public,
        identity=name,
        principals=list(principals),
        host=host,
        validity=kw.pop("validity", "always:forever"),
    )
    key = paramiko.Ed25519Key(filename=str(keys / "host"))
    key.load_certificate(str(cert))
    return key


def ca_key(keys: Path, name: str = "ca") -> paramiko.PKey:
    """The CA's public key, as a @cert-authority line gives it."""
    key_type, b64 = (keys / f"{name}.pub").read_text().split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(b64))


CASES = [
    # (case, certificate options, expected message fragment or None when accepted)
    ("valid", {}, None),
    ("second principal", {"principals": ("web1", "10.0.0.1")}, None),
    ("explicit window", {"validity": "20300101:20300401"}, None),
    ("unknown CA", {"ca": "other_ca"}, "not a @cert-authority for this host"),
    ("other principal", {"principals": ("10.0.0.2",)}, "is for 10.0.0.2, not 10.0.0.1"),
    ("expired", {"validity": "20200101:20200201"}, "is not valid now"),
    ("not yet valid", {"validity": "20400101:20400201"}, "is not valid now"),
    ("a user certificate", {"host": False}, "is not a host certificate"),
]


@pytest.mark.parametrize(("case", "options", "message"), CASES, ids=[c[0] for c in CASES])
def test_host_certificate_cases(keys, case, options, message):
    key = certified(keys, case.replace(" ", "_"), **options)
    if message is None:
        cert = check_host_certificate(
            key, [ca_key(keys)], principal="10.0.0.1", where="host web1", now=NOW
        )
        assert cert.key_id == case.replace(" ", "_")
        return
    with pytest.raises(HostKeyRejected) as err:
        check_host_certificate(
            key, [ca_key(keys)], principal="10.0.0.1", where="host web1", now=NOW
        )
    assert str(err.value).startswith("host web1: ")
    assert message in str(err.value)


def test_a_tampered_certificate_is_refused(keys):
    key = certified(keys, "tampered", principals=("10.0.0.1",))
    blob = bytearray(key.public_blob.key_blob)
    # Widen the principals by editing the signed part: the CA's signature no longer matches.
    index = bytes(blob).index(b"10.0.0.1")
    blob[index : index + 8] = b"10.0.0.9"
    key.public_blob = paramiko.pkey.PublicBlob(key.public_blob.key_type, bytes(blob))
    with pytest.raises(HostKeyRejected, match="the CA signature does not verify"):
        check_host_certificate(key, [ca_key(keys)], principal="10.0.0.9", where="host x", now=NOW)


def test_a_plain_key_has_no_certificate(keys):
    key = paramiko.Ed25519Key(filename=str(keys / "host"))
    with pytest.raises(HostKeyRejected, match="presented no certificate"):
        check_host_certificate(key, [ca_key(keys)], principal="10.0.0.1", where="host x")


def test_parse_certificate_reads_what_ssh_keygen_shows(keys):
    key = certified(keys, "parsed", principals=("a", "b"), validity="20300101:20300401")
    cert = parse_certificate(key.public_blob.key_blob)
    shown = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(keys / "parsed-cert.pub")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert cert.principals == ("a", "b") and cert.cert_type == 2
    assert 'Key ID: "parsed"' in shown and "host certificate" in shown
    assert cert.signature_key == ca_key(keys).asbytes()


@pytest.mark.parametrize(
    ("patterns", "hostname", "matched"),
    [
        ("[127.0.0.1]:*", "[127.0.0.1]:2222", True),
        ("[127.0.0.1]:*", "127.0.0.1", False),
        ("[127.0.0.1]:2222", "[127.0.0.2]:2222", False),
        ("*.example.com", "web1.example.com", True),
        ("*.example.com", "example.com", False),
        ("web?.example.com", "web1.example.com", True),
        ("*.example.com,!db*.example.com", "db1.example.com", False),
        ("*.example.com,!db*.example.com", "web1.example.com", True),
        ("WEB1.example.com", "web1.EXAMPLE.com", True),
    ],
)
def test_known_hosts_patterns(patterns, hostname, matched):
    assert _matches(patterns, hostname) is matched


def test_hashed_known_hosts_pattern():
    hashed = paramiko.HostKeys.hash_host("[127.0.0.1]:2222")
    assert _matches(hashed, "[127.0.0.1]:2222")
    assert not _matches(hashed, "[127.0.0.1]:2223")
