"""kmpops.access (authorized_keys text) and kmpops.plans.access (drift, key changes) as cases."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from kmpops.access import (
    add_key,
    new_ed25519_keypair,
    parse_authorized_keys,
    parse_public_key,
    remove_keys,
)
from kmpops.plans.access import AccessGrant, AccessList, access_drift, plan_key_change

NOW = datetime(2026, 11, 27, tzinfo=UTC)
KEYS = {name: new_ed25519_keypair(f"{name}@laptop")[1] for name in ("alice", "bob", "eve", "svc")}


def fp(name: str) -> str:
    return KEYS[name].fingerprint


def test_parse_with_options_comments_and_junk() -> None:
    alice = KEYS["alice"]
    text = (
        "# managed by kmp-ops\n\n"
        f'from="10.0.0.1",no-pty {alice.public_line()}\n'
        "garbage line\n"
        f"{KEYS['bob'].key_type} {KEYS['bob'].key_b64}\n"
    )
    keys = parse_authorized_keys(text)
    assert [k.fingerprint for k in keys] == [fp("alice"), fp("bob")]
    assert keys[0].options == 'from="10.0.0.1",no-pty' and keys[0].comment == "alice@laptop"
    assert keys[1].comment == ""


@pytest.mark.parametrize(
    "line",
    ["", "# comment", "ssh-ed25519", "ssh-ed25519 !!!notbase64", "ssh-rsa AAAAC3NzaC1lZDI1NTE5"],
)
def test_parse_public_key_refuses(line) -> None:
    with pytest.raises(ValueError):
        parse_public_key(line)


def test_fingerprint_matches_ssh_keygen_format() -> None:
    assert fp("alice").startswith("SHA256:") and len(fp("alice")) == 50


def test_add_is_idempotent_and_remove_keeps_other_lines() -> None:
    text = "# header\n" + KEYS["alice"].line() + "\n"
    added = add_key(text, KEYS["bob"])
    assert add_key(added, KEYS["bob"]) == added
    assert added.endswith(KEYS["bob"].line() + "\n")
    removed = remove_keys(added, [fp("alice")])
    assert removed == "# header\n" + KEYS["bob"].line() + "\n"
    assert add_key("", KEYS["eve"]) == KEYS["eve"].line() + "\n"
    assert remove_keys(KEYS["eve"].line(), [fp("eve")]) == ""


def grant(user: str, envs: list[str], expires: datetime | None = None) -> AccessGrant:
    return AccessGrant(
        user=user, public_keys=[KEYS[user].public_line()], environments=envs, expires=expires
    )


ACCESS = AccessList(
    users=[
        grant("alice", ["production", "staging"]),
        grant("bob", ["staging"]),
    ]
)
HOSTS = {"prd-1": "production", "stg-1": "staging"}

DRIFT = [
    (
        "in line with the list",
        {"prd-1": ["svc", "alice"], "stg-1": ["svc", "alice", "bob"]},
        ACCESS,
        [],
    ),
    (
        "unknown key",
        {"prd-1": ["svc", "alice", "eve"], "stg-1": ["alice", "bob"]},
        ACCESS,
        [("prd-1", "unknown-key", "eve")],
    ),
    (
        "missing key",
        {"prd-1": ["alice"], "stg-1": ["alice"]},
        ACCESS,
        [("stg-1", "missing-key", "bob")],
    ),
    (
        "out of scope",
        {"prd-1": ["alice", "bob"], "stg-1": ["alice", "bob"]},
        ACCESS,
        [("prd-1", "out-of-scope", "bob")],
    ),
    (
        "expired grant still present, not reported missing elsewhere",
        {"prd-1": ["alice"], "stg-1": ["alice"]},
        AccessList(
            users=[
                grant("alice", ["production", "staging"]),
                grant("bob", ["staging"], NOW - timedelta(days=1)),
            ]
        ),
        [],
    ),
    (
        "expired grant present",
        {"prd-1": ["alice"], "stg-1": ["alice", "bob"]},
        AccessList(
            users=[
                grant("alice", ["production", "staging"]),
                grant("bob", ["staging"], NOW),
            ]
        ),
        [("stg-1", "expired-grant", "bob")],
    ),
    ("unreachable host is not judged", {"prd-1": ["alice"]}, ACCESS, []),
]


@pytest.mark.parametrize(("name", "found", "access", "expected"), DRIFT, ids=[d[0] for d in DRIFT])
def test_access_drift(name, found, access, expected) -> None:
    keys = {h: [KEYS[u] for u in users] for h, users in found.items()}
    drift = access_drift(keys, HOSTS, access, now=NOW, service_fingerprints=frozenset({fp("svc")}))
    by_fp = {v.fingerprint: k for k, v in KEYS.items()}
    assert [(d.host, d.kind, by_fp[d.fingerprint]) for d in drift] == expected


def test_access_list_validation() -> None:
    with pytest.raises(ValidationError, match=r"public_keys\[0\]"):
        AccessGrant(user="x", public_keys=["not a key"], environments=["staging"])
    with pytest.raises(ValidationError, match="timezone-aware"):
        AccessGrant(
            user="x",
            public_keys=[KEYS["eve"].public_line()],
            environments=["staging"],
            expires=datetime(2027, 1, 1),
        )
    with pytest.raises(ValidationError, match="listed twice"):
        AccessList(users=[grant("bob", ["staging"]), grant("bob", ["production"])])


def test_plan_key_change() -> None:
    found = {"a": [KEYS["alice"]], "b": []}
    add = plan_key_change(found, KEYS["alice"], "add")
    assert [(c.host, c.changes) for c in add] == [("a", False), ("b", True)]
    rm = plan_key_change(found, KEYS["alice"], "remove")
    assert [(c.host, c.changes) for c in rm] == [("a", True), ("b", False)]


class _Host:
    def __init__(self, **vars: str) -> None:
        self.vars = vars


@pytest.mark.parametrize(
    ("vars", "template", "path"),
    [
        ({"root": "/srv/h1"}, None, "/srv/h1/etc/authorized_keys"),
        ({"root": "/srv/h1", "authorized_keys": "/etc/ssh/keys/ops"}, None, "/etc/ssh/keys/ops"),
        ({}, None, ".ssh/authorized_keys"),
        ({"root": "/srv/h1"}, "{root}/keys", "/srv/h1/keys"),
    ],
)
def test_authorized_keys_path(vars, template, path) -> None:
    from kmpops.access import authorized_keys_path

    assert authorized_keys_path(_Host(**vars), template) == path


def test_authorized_keys_path_refuses_traversal() -> None:
    from kmpops.access import authorized_keys_path
    from kmpops.errors import UnsafeValueError

    with pytest.raises(UnsafeValueError):
        authorized_keys_path(_Host(root="/srv/h1"), "{root}/../../etc/shadow")


def _short_blob() -> str:
    import base64

    return base64.b64encode(base64.b64decode(KEYS["bob"].key_b64)[:-5]).decode()


ALLOWED = ["no-pty", 'from="10.0.0.0/8"']


@pytest.mark.parametrize(
    ("line", "options", "comment"),
    [
        (KEYS["bob"].public_line(), "", "bob@laptop"),
        (f"{KEYS['bob'].key_type} {KEYS['bob'].key_b64}", "", ""),
        (f"no-pty {KEYS['bob'].public_line()}", "no-pty", "bob@laptop"),
        (
            f'from="10.0.0.0/8",no-pty {KEYS["bob"].public_line()}',
            'from="10.0.0.0/8",no-pty',
            "bob@laptop",
        ),
        (f"{KEYS['bob'].key_type} {KEYS['bob'].key_b64} Bob Smith 2026", "", "Bob Smith 2026"),
    ],
)
def test_parse_offered_key_accepts(line, options, comment) -> None:
    from kmpops.access import parse_offered_key

    key = parse_offered_key(line, allowed_options=ALLOWED)
    assert (key.options, key.comment, key.fingerprint) == (options, comment, fp("bob"))
    assert key.line() == line.strip()


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (f"$(id>/tmp/pwned) {KEYS['bob'].public_line()}", "not a key option"),
        (f'command="id" {KEYS["bob"].public_line()}', "not allowed"),
        (f'no-pty,command="id" {KEYS["bob"].public_line()}', 'command="id"'),
        (f'from="10.0.0.0/8\\" {KEYS["bob"].public_line()}', "not a key option"),
        (f"{KEYS['bob'].public_line()} x$(id)", "comment"),
        (f"{KEYS['bob'].public_line()} `id`", "comment"),
        (f"{KEYS['bob'].public_line()}\nssh-ed25519 AAAA", "one line"),
        (f"ssh-dss {KEYS['bob'].key_b64}", "ssh-dss not allowed"),
        (f"ssh-rsa {KEYS['bob'].key_b64}", "does not match"),
        (f"{KEYS['bob'].key_type} {_short_blob()}", "not a valid"),
        (f"{KEYS['bob'].key_type} not!base64", "base64"),
        ("", "key type"),
    ],
)
def test_parse_offered_key_refuses(line, why) -> None:
    from kmpops.access import parse_offered_key

    with pytest.raises(ValueError, match=re.escape(why)):
        parse_offered_key(line, allowed_options=ALLOWED)


def test_parse_offered_key_without_config_checks_option_syntax_only() -> None:
    from kmpops.access import parse_offered_key

    line = f'command="id" {KEYS["bob"].public_line()}'
    assert parse_offered_key(line, allowed_options=None).options == 'command="id"'
    with pytest.raises(ValueError, match="not allowed"):
        parse_offered_key(line)
