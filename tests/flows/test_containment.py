"""incident-response containment beyond rollback, on the real sshd hosts of the session stack:
drain (the sample service's /health answers 503) and recovery's undrain, a compromised key
removed from every host of the environment's authorized_keys (never kmp-ops' own), an address
blocked — the last two chosen by the alert's labels, so they wait for an approval (given here by
a thread that answers the paused run like a person in the UI)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

HOST = "prd-2"


@pytest.fixture
def contain_env(stack, tmp_path, monkeypatch):
    """The stack's ops.yaml with automatic containment for critical incidents, no alert rules,
    records and notifications under ``tmp_path``."""
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["records"] = {
        "url": f"sqlite:///{tmp_path / 'records.db'}",
        "audit_key": data["records"]["audit_key"],
    }
    sink = [f"jsonl://{tmp_path / 'notifications.jsonl'}"]
    data["notifications"] = {
        "routes": {"critical": sink, "warning": sink, "info": sink},
        "escalation": {"L1": sink, "L2": sink, "L3": sink},
        "ack_timeout": "1s",
        "responder_tokens": data["notifications"]["responder_tokens"],
    }
    data["alerts"] = {}
    for env in data["environments"].values():
        env["policy"]["auto_containment"] = ["critical"]
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(path))
    return path


def timeline(incident_id: int) -> list[str]:
    from tasks.common import records

    _, events = records().incident(incident_id)
    return [e.message for e in events]


class Approver:
    """Approves paused incident-response runs (containment approvals) as ``bob``."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Approver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        from kmpops.approve import approve_run

        seen: set = set()
        with get_client(sync_client=True) as client:
            while not self._stop.is_set():
                runs = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["incident-response"])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.PAUSED])
                        )
                    ),
                )
                for run in runs:
                    if run.state is None or run.state.id in seen:
                        continue
                    seen.add(run.state.id)
                    approve_run(  # reads the request code the paused run shows, as the CLI does
                        os.environ["PREFECT_API_URL"],
                        str(run.id),
                        decision="approve",
                        approver="bob",
                        reason="contain it",
                        token=self.token,
                    )
                    self.answered += 1
                time.sleep(0.3)


def respond(stack, rule: str, **labels: str) -> tuple[dict, list[str]]:
    """incident-response for a critical ``rule`` on prd-1 with ``labels``, no escalation, a
    person approving: its result and its timeline."""
    from flows.incident_response import incident_response
    from kmpops.stack import approver_token

    with Approver(approver_token(Path(stack.root), "bob")):
        result = incident_response(
            alert={"rule": rule, "severity": "critical", "hosts": ["prd-1"], "labels": labels},
            options={"escalate": False, "approval_timeout_s": 60},
        )
    return result, timeline(result["incident_id"])


def key_fingerprints(host) -> list[str]:
    from kmpops.access import parse_authorized_keys

    text = Path(host.root, "etc/authorized_keys").read_text()
    return [k.fingerprint for k in parse_authorized_keys(text)]


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status, json.loads(r.read())["status"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["status"]


@pytest.fixture
def running_service(stack, tmp_path_factory):
    """The sample service live on prd-2 (installed and started here if it is not)."""
    import subprocess

    from kmpops.stack.sample_service import build_release, install_release

    host = stack.host(HOST)
    deploy = Path(host.root) / "srv" / "web"
    if not (deploy / "current").exists():
        dist = tmp_path_factory.mktemp("contain-dist")
        install_release(build_release("0.9.0-contain", dist), deploy)
    control = str(deploy / "current" / "control")
    subprocess.run([control, "start", "--port", str(host.web_port)], check=True, timeout=30)
    yield host
    (deploy / "shared" / "drain").unlink(missing_ok=True)


def test_drain_then_recovery_puts_it_back(contain_env, running_service):
    from flows.incident_response import incident_response
    from tasks.incident import run_service_command

    port = running_service.web_port
    assert health(port) == (200, "ok")
    run_service_command.fn("web", HOST, "drain")  # what containment runs: out of rotation
    assert health(port) == (503, "draining")
    run_service_command.fn("web", HOST, "undrain")
    assert health(port) == (200, "ok")

    result = incident_response(
        alert={"rule": "high_cpu", "severity": "critical", "hosts": [HOST], "title": "cpu"},
        options={"escalate": False},
    )
    assert result["contained"] is True
    text = timeline(result["incident_id"])
    assert f"drained {HOST} (out of rotation)" in text
    assert f"{HOST} back in rotation" in text
    assert text.index(f"drained {HOST} (out of rotation)") < text.index(f"{HOST} back in rotation")
    assert health(port) == (200, "ok")


def test_compromised_key_is_disabled_on_every_host(contain_env, stack):
    from kmpops.access import fingerprint_of_key_file, new_ed25519_keypair
    from kmpops.connectors.ssh import SSHConnection
    from tasks.common import ops_config

    _, leaked = new_ed25519_keypair("ci-deployer@leaked")
    data = yaml.safe_load(contain_env.read_text())
    data["incidents"] = {
        "known_keys": [{"owner": "ci-deployer", "fingerprint": leaked.fingerprint}]
    }
    contain_env.write_text(yaml.safe_dump(data, sort_keys=False))
    stamp = time.time_ns() + 1_000_000  # the config cache is keyed by mtime
    os.utime(contain_env, ns=(stamp, stamp))
    holders = [stack.host("prd-1"), stack.host("prd-3"), stack.host("stg-1")]
    for h in holders:
        keys = Path(h.root) / "etc" / "authorized_keys"
        keys.write_text(keys.read_text() + leaked.public_line() + "\n")

    result, result_text = respond(stack, "auth_failures", fingerprint=leaked.fingerprint)
    assert result["contained"] is True
    lines = [m for m in result_text if m.startswith("disabled key")]
    assert len(lines) == 1 and lines[0].startswith(f"disabled key {leaked.fingerprint} on ")
    # every host of the incident's environment (production), none elsewhere
    assert sorted(lines[0].rsplit(" on ", 1)[1].split(", ")) == ["prd-1", "prd-3"]
    own = fingerprint_of_key_file(Path(stack.key_file))
    for h in stack.hosts:
        assert own in key_fingerprints(h)
        assert (leaked.fingerprint in key_fingerprints(h)) is (h.name == "stg-1")
    with SSHConnection.from_host(ops_config().host("prd-1")[1]) as conn:  # kmp-ops still gets in
        assert conn.run("echo in", check=True).stdout.strip() == "in"
    stg = Path(stack.host("stg-1").root) / "etc" / "authorized_keys"
    stg.write_text(stg.read_text().replace(leaked.public_line() + "\n", ""))

    # kmp-ops' own key is never disabled: refused before any approval, every host keeps it.
    refused, refused_text = respond(stack, "auth_failures", fingerprint=own)
    assert refused["contained"] is False
    assert f"refused disable_key {own}: kmp-ops' own key (it would lock kmp-ops out)" in (
        refused_text
    )
    for h in stack.hosts:
        assert own in key_fingerprints(h)


def test_hostile_address_is_blocked_and_a_bad_one_changes_nothing(contain_env, stack):

    blocked = Path(stack.host("prd-1").root) / "srv" / "web" / "shared" / "blocked-addresses"
    blocked.unlink(missing_ok=True)
    result, result_text = respond(stack, "request_flood", address="203.0.113.7")
    assert result["contained"] is True, result_text
    assert blocked.read_text() == "203.0.113.7/32\n"
    assert "blocked 203.0.113.7/32 on prd-1" in result_text

    bad, bad_text = respond(stack, "request_flood", address="203.0.113.8; touch /tmp/pwned")
    assert bad["contained"] is False
    assert any("not an IP address or network" in m for m in bad_text)
    assert blocked.read_text() == "203.0.113.7/32\n"


def test_contains_before_the_first_page_times_out(contain_env, running_service):
    """Contain first: automatic containment runs while L1 is still being paged, and the
    escalation goes on (L2) while and after containment runs."""
    from flows.incident_response import incident_response
    from tasks.common import records

    result = incident_response(
        alert={"rule": "high_cpu", "severity": "critical", "hosts": [HOST], "title": "cpu"},
        options={"ack_timeout_s": 5},
    )
    _, events = records().incident(result["incident_id"])
    text = [e.message for e in events]
    drained = text.index(f"drained {HOST} (out of rotation)")
    paged = text.index("escalated to L1")
    l1_timeout = text.index("no acknowledgement at L1 within 5 s")
    assert paged < drained < l1_timeout, text
    assert events[drained].ts < events[l1_timeout].ts
    assert "escalated to L2" in text[drained:] and "escalated to L3" in text
    assert result["contained"] is True
    assert health(running_service.web_port) == (200, "ok")  # recovery put it back
