"""Signals are authenticated and bounded: attacks on the Alertmanager path, on the real stack.

A real receiver process (``deployments/alertmanager_receiver.py``), the session's real Prefect
server and a served incident-response deployment with its real event trigger, the real sshd
fleet. Each attack is what an attacker (or a mislabelled alert) can send; after it, every host's
authorized_keys and blocklist are read back from the host roots and must be unchanged, and the
incident record must say why containment refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PORT_BASE, REPO
from tests.serving import serve_subprocess, stop_process, wait_for_trigger

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

RECEIVER = REPO / "deployments" / "alertmanager_receiver.py"
TOKEN = "am-" + uuid.uuid4().hex


# -- helpers -------------------------------------------------------------------------------


def start_receiver(
    port: int, log: Path, *args: str, token_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """The receiver as production runs it: a process of its own, from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "KMPOPS_ALERTMANAGER_TOKEN_FILE"}
    if token_file is not None:
        env["KMPOPS_ALERTMANAGER_TOKEN_FILE"] = str(token_file)
    env["PYTHONPATH"] = str(REPO)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(RECEIVER), "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the receiver answers /health (AssertionError if it exited first)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"receiver exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver not serving on {port}") from None
            time.sleep(0.2)


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        return json.loads(resp.read())


def post(port: int, body: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/alertmanager", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def webhook(*labels: dict[str, str]) -> bytes:
    """An Alertmanager (version 4) webhook message with one firing alert per label set."""
    return json.dumps(
        {
            "version": "4",
            "status": "firing",
            "receiver": "kmp-ops",
            "groupKey": "{}",
            "alerts": [
                {"status": "firing", "labels": ls, "annotations": {}, "startsAt": ""}
                for ls in labels
            ],
        }
    ).encode()


def fired_rules(since: float) -> set[str]:
    """Rules of the ``kmpops.alert.firing`` events the Prefect server has stored since then."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client

    body = {
        "filter": {
            "occurred": {"since": datetime.fromtimestamp(since, UTC).isoformat()},
            "event": {"name": ["kmpops.alert.firing"]},
        },
        "limit": 50,
    }
    with get_client(sync_client=True) as client:
        resp = client._client.post("/events/filter", json=body)
        resp.raise_for_status()
    return {str(e["payload"].get("rule")) for e in resp.json()["events"]}


def host_files(stack: Any) -> dict[str, tuple[str, str | None]]:
    """Every host's authorized_keys and blocklist, read from the host roots."""
    out = {}
    for h in stack.hosts:
        keys = Path(h.root, "etc", "authorized_keys").read_text()
        blocked = Path(h.root, "srv", "web", "shared", "blocked-addresses")
        out[h.name] = (keys, blocked.read_text() if blocked.exists() else None)
    return out


# -- the receiver --------------------------------------------------------------------------


def test_receiver_refuses_to_start_without_a_token(tmp_path):
    port = PORT_BASE + 730
    proc = start_receiver(port, tmp_path / "no-token.log")
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        pytest.fail("the receiver started (and served) without a token")
    log = (tmp_path / "no-token.log").read_text()
    assert code != 0
    assert "KMPOPS_ALERTMANAGER_TOKEN_FILE" in log and "--insecure-local" in log

    # an empty token file is no token
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    proc = start_receiver(port, tmp_path / "empty.log", token_file=empty)
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        stop_process(proc)
    assert "is empty" in (tmp_path / "empty.log").read_text()

    # --insecure-local is for loopback only
    proc = start_receiver(port, tmp_path / "wide.log", "--insecure-local", "--host", "0.0.0.0")
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        stop_process(proc)
    assert "--insecure-local only on a loopback address" in (tmp_path / "wide.log").read_text()


def test_insecure_local_serves_on_loopback_and_says_so(tmp_path):
    port = PORT_BASE + 731
    proc = start_receiver(port, tmp_path / "insecure.log", "--insecure-local")
    try:
        wait_serving(port, proc)
    finally:
        stop_process(proc)
    assert "WITHOUT AUTHENTICATION" in (tmp_path / "insecure.log").read_text()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory) -> Iterator[int]:
    """A receiver process with a token, emitting to the session's Prefect server."""
    root = tmp_path_factory.mktemp("receiver")
    token_file = root / "am-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = PORT_BASE + 732
    proc = start_receiver(port, root / "receiver.log", token_file=token_file)
    try:
        wait_serving(port, proc)
        yield port
    finally:
        stop_process(proc)


def test_unauthenticated_requests_are_refused_and_change_nothing(stack, receiver):
    since = time.time() - 1
    mark = uuid.uuid4().hex[:8]
    before = health(receiver)["received"]
    for token in (None, "wrong", TOKEN + "x", ""):
        rule = f"forged_{mark}_{len(token or '')}"
        status, answer = post(receiver, webhook({"alertname": rule, "severity": "critical"}), token)
        assert (status, answer) == (401, {"error": "unauthorized"})
    assert health(receiver)["received"] == before
    # the control: an authenticated alert does reach the Prefect server
    control = f"genuine_{mark}"
    status, _ = post(receiver, webhook({"alertname": control, "severity": "critical"}), TOKEN)
    assert status == 200
    deadline = time.monotonic() + 60
    while control not in (seen := fired_rules(since)):
        assert time.monotonic() < deadline, "the authenticated alert never became an event"
        time.sleep(0.5)
    assert not [r for r in seen if r.startswith(f"forged_{mark}")]


def test_a_stalled_client_is_cut_off(receiver):
    """A connection that stops sending (headers or body) is closed by the receiver."""
    stalled_headers = socket.create_connection(("127.0.0.1", receiver), timeout=60)
    stalled_headers.sendall(b"POST /alertmanager HTTP/1.1\r\nHost: x\r\n")
    stalled_body = socket.create_connection(("127.0.0.1", receiver), timeout=60)
    stalled_body.sendall(
        b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        + b'{"version": "4", '
    )
    try:
        for sock in (stalled_headers, stalled_body):
            try:
                data = sock.recv(4096)
            except TimeoutError:
                pytest.fail("the receiver kept a stalled connection open")
            assert data == b"" or data.startswith(b"HTTP/1.1 408")
    finally:
        stalled_headers.close()
        stalled_body.close()
    assert health(receiver)["status"] == "ok"


def test_deeply_nested_json_is_refused_and_the_receiver_keeps_serving(receiver):
    before = health(receiver)["received"]
    for body in (b"[" * 200_000, b'{"a":' * 100_000, b"[" * 65 + b"]" * 65):
        status, answer = post(receiver, body, TOKEN)
        assert status == 400 and "nested" in answer["error"]
    after = health(receiver)
    assert after["status"] == "ok" and after["received"] == before


def test_an_oversized_body_is_refused(receiver):
    body = webhook({"alertname": "big", "severity": "info", "pad": "x" * (2 << 20)})
    try:
        status, _ = post(receiver, body, TOKEN)
    except (ConnectionError, urllib.error.URLError):  # closed while we were still sending
        status = 413
    assert status == 413
    assert health(receiver)["status"] == "ok"


# -- containment from labels ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(stack, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The attack fleet: the stack's ops.yaml with automatic containment for critical alerts
    everywhere, ``web`` deployed on every host (as in production), an admin's key on every
    host (known to kmp-ops), a served incident-response deployment with the alert trigger and
    a receiver with a token in front of it."""
    from kmpops.access import new_ed25519_keypair

    root = tmp_path_factory.mktemp("signals-fleet")
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["records"] = {
        "url": f"sqlite:///{root / 'records.db'}",
        "audit_key": data["records"]["audit_key"],
    }
    sink = [f"jsonl://{root / 'notifications.jsonl'}"]
    data["notifications"] = {
        "routes": {"critical": sink, "warning": sink, "info": sink},
        "escalation": {"L1": sink, "L2": sink, "L3": sink},
        "ack_timeout": "1s",
        "responder_tokens": data["notifications"]["responder_tokens"],
    }
    data["alerts"] = {}
    for env in data["environments"].values():
        env["policy"]["auto_containment"] = ["critical"]
        env["policy"]["approval_timeout"] = "2s"
    _, admin = new_ed25519_keypair("admin@ops")
    data["incidents"] = {"known_keys": [{"owner": "admin", "fingerprint": admin.fingerprint}]}
    config = root / "ops.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    saved = {}
    for h in stack.hosts:
        keys = Path(h.root, "etc", "authorized_keys")
        saved[keys] = keys.read_text()
        keys.write_text(saved[keys] + admin.public_line() + "\n")
        blocked = Path(h.root, "srv", "web", "shared", "blocked-addresses")
        saved[blocked] = blocked.read_text() if blocked.exists() else None

    mp = pytest.MonkeyPatch()
    mp.setenv("KMPOPS_CONFIG", str(config))
    from tasks.common import records

    for h in stack.hosts:
        records().record_release(
            service="web", environment=h.environment, host=h.name, version="1.0.0", deployed_by="ci"
        )
    name = f"signals-{uuid.uuid4().hex[:8]}"
    code = (
        "from flows.incident_response import incident_response\n"
        "from tasks.alerting import incident_trigger\n"
        "from prefect import serve\n"
        f"serve(incident_response.to_deployment(name={name!r}, triggers=[incident_trigger()]))\n"
    )
    served = serve_subprocess(code, root / "serve.log")
    token_file = root / "am-token"
    token_file.write_text(TOKEN)
    port = PORT_BASE + 733
    am = start_receiver(port, root / "receiver.log", token_file=token_file)
    try:
        wait_for_trigger(f"incident-response/{name}", served, timeout=90)
        wait_serving(port, am)
        yield {"port": port, "deployment": name, "admin": admin, "records": records}
    finally:
        stop_process(am)
        stop_process(served)
        for path, text in saved.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
        mp.undo()


def attack(fleet: dict[str, Any], labels: dict[str, str]) -> tuple[Any, list[str]]:
    """POST ``labels`` as one firing alert with a valid token, wait for the incident-response
    run it starts to finish; the incident and its timeline."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    mark = uuid.uuid4().hex[:8]
    status, _ = post(fleet["port"], webhook({**labels, "attack": mark}), TOKEN)
    assert status == 200
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[fleet["deployment"]])
                )
            )
            mine = [r for r in runs if r.parameters["alert"]["labels"].get("attack") == mark]
            state = mine[0].state if mine else None
            # an approval that times out shows "paused and never resumed" for a moment,
            # until the run puts itself back to Running: not the end of the run
            if (
                state is not None
                and state.is_final()
                and "never resumed" not in (state.message or "")
            ):
                break
            assert time.monotonic() < deadline, f"no finished run for attack {mark}"
            time.sleep(1)
    assert mine[0].state.is_completed(), mine[0].state
    (incident,) = [i for i in fleet["records"]().incidents() if mark in (i.alert_key or "")]
    _, events = fleet["records"]().incident(incident.id)
    return incident, [e.message for e in events]


def test_block_everything_is_refused(stack, fleet):
    before = host_files(stack)
    incident, lines = attack(
        fleet, {"alertname": "request_flood", "severity": "critical", "address": "0.0.0.0/0"}
    )
    assert host_files(stack) == before
    assert any("refused block_address 0.0.0.0/0: wider than /24" in m for m in lines), lines
    assert incident.contained_at is None


def test_blocking_the_fleets_own_address_is_refused(stack, fleet):
    """Every host of the local stack is 127.0.0.1: blocking it would cut kmp-ops off."""
    before = host_files(stack)
    _, lines = attack(
        fleet, {"alertname": "request_flood", "severity": "critical", "address": "127.0.0.1"}
    )
    assert host_files(stack) == before
    assert any("refused block_address 127.0.0.1/32: the address of host" in m for m in lines)


def test_an_admins_key_is_not_removed_on_a_label(stack, fleet):
    admin = fleet["admin"]
    before = host_files(stack)
    incident, lines = attack(
        fleet,
        {
            "alertname": "anything",
            "severity": "critical",
            "incident_type": "compromised_credentials",
            "fingerprint": admin.fingerprint,
        },
    )
    assert host_files(stack) == before  # the key is still on every host
    text = "\n".join(lines)
    assert "approval required (targets chosen from the alert's labels" in text, text
    assert any(m.startswith("approval incident/") for m in lines), text
    assert "disabled key" not in text
    assert incident.contained_at is None


def test_an_unknown_key_or_kmpops_own_key_is_refused(stack, fleet):
    from kmpops.access import fingerprint_of_key_file, new_ed25519_keypair

    _, stranger = new_ed25519_keypair("nobody@nowhere")
    own = fingerprint_of_key_file(Path(stack.key_file))
    before = host_files(stack)
    for fingerprint, reason in (
        (stranger.fingerprint, "not a key kmp-ops knows"),
        (own, "kmp-ops' own key"),
    ):
        _, lines = attack(
            fleet,
            {"alertname": "auth_failures", "severity": "critical", "fingerprint": fingerprint},
        )
        assert any(f"refused disable_key {fingerprint}: {reason}" in m for m in lines), lines
    assert host_files(stack) == before


def test_a_label_cannot_name_a_host_outside_the_inventory(stack, fleet):
    before = host_files(stack)
    _, lines = attack(
        fleet,
        {
            "alertname": "request_flood",
            "severity": "critical",
            "address": "203.0.113.9",
            "host": "intruder",
        },
    )
    assert host_files(stack) == before
    assert any("refused host intruder: not a host of" in m for m in lines), lines
