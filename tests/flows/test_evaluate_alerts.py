"""evaluate-alerts on the real stack: Prometheus queries, state in the records store, notifications.

Rules query Prometheus with constant vectors (``vector(0.5)``) so the value is under the test's
control, and the flow is given explicit evaluation times (``at``) so ``for:`` durations, repeat
intervals and silences are checked without waiting. Every flow run is a fresh evaluator: the
``for:`` clock survives only through the records store. The event path is checked end to end: a
served incident-response deployment with the trigger starts on the emitted event.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.flows.alert_fixtures import ops_yaml_writer, wait_for_deployment_run
from tests.serving import serve_subprocess, stop_process, wait_for_trigger

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


@pytest.fixture
def alert_env(stack, tmp_path, monkeypatch):
    """A variant of the stack's ops.yaml with its own records store and sink; returns a
    function ``configure(alerts, **notifications)`` that (re)writes it."""
    return ops_yaml_writer(stack, tmp_path, monkeypatch, repeat_interval="1m")


def messages(sink: Path) -> list[str]:
    from kmpops.connectors.notify import read_sink

    return [m["title"] for m in read_sink(sink)]


def test_pending_firing_reminder_resolved(alert_env):
    from flows.evaluate_alerts import evaluate_alerts
    from tasks.common import records

    rule = {"threshold": 0.1, "duration": "3s", "severity": "warning", "query": "vector(0.5)"}
    alert_env({"probe": rule})
    t0 = datetime.now(UTC).replace(microsecond=0)

    def run(offset_s: float) -> dict:
        (summary,) = evaluate_alerts(
            rules=["probe"], at=t0 + timedelta(seconds=offset_s), start_incidents="none"
        )
        return summary

    assert run(0)["changes"] == ["probe{}: inactive -> pending"]
    assert run(1)["changes"] == []
    assert records().alert_states("probe")[0].state == "pending"
    fired = run(3)  # a new flow run: the for: clock came from the records store
    assert fired["changes"] == ["probe{}: pending -> firing"]
    assert len(fired["notified"]) == 1
    assert run(4)["notified"] == []  # one message per state change
    assert len(run(64)["notified"]) == 1  # reminder after repeat_interval (1m)
    alert_env({"probe": {**rule, "query": "vector(0)"}})
    resolved = run(65)
    assert resolved["changes"] == ["probe{}: firing -> resolved"]
    titles = messages(alert_env.sink)
    assert [t.split("]")[0] for t in titles] == ["[FIRING", "[STILL FIRING", "[RESOLVED"]
    state = records().alert_states("probe")[0]
    assert state.state == "resolved" and state.data["notified"]["state"] == "resolved"
    actions = [e.action for e in records().audit_events(subject="probe{}")]
    assert actions == ["alert.pending", "alert.firing", "alert.resolved"]


def test_silence_holds_notifications_until_it_ends(alert_env):
    from flows.evaluate_alerts import evaluate_alerts
    from kmpops.records.alerting import add_silence
    from tasks.common import records

    alert_env(
        {"noisy": {"threshold": 0.1, "duration": "0s", "severity": "info", "query": "vector(1)"}}
    )
    t0 = datetime.now(UTC).replace(microsecond=0)
    add_silence(
        records(),
        matchers={"alertname": "noisy"},
        starts_at=t0 - timedelta(seconds=1),
        ends_at=t0 + timedelta(seconds=10),
        created_by="maintenance notice",
    )
    (first,) = evaluate_alerts(rules=["noisy"], at=t0, start_incidents="none")
    assert first["changes"] == ["noisy{}: inactive -> pending", "noisy{}: pending -> firing"]
    assert first["notified"] == [] and first["silenced"] == ["noisy{}"]
    (later,) = evaluate_alerts(rules=["noisy"], at=t0 + timedelta(seconds=11))
    assert later["changes"] == [] and len(later["notified"]) == 1
    assert messages(alert_env.sink) == [later["notified"][0]]


@pytest.fixture
def served_incident_response(alert_env):
    """Serve incident-response with the alert trigger in a subprocess (stopped by pid)."""
    name = f"trigger-test-{uuid.uuid4().hex[:8]}"
    code = (
        "from flows.incident_response import incident_response\n"
        "from tasks.alerting import incident_trigger\n"
        "from prefect import serve\n"
        f"serve(incident_response.to_deployment(name={name!r}, triggers=[incident_trigger()]))\n"
    )
    proc = serve_subprocess(code, Path(os.environ["KMPOPS_CONFIG"]).parent / "serve.log")
    try:
        wait_for_trigger(f"incident-response/{name}", proc, timeout=60)
        yield name
    finally:
        stop_process(proc)


def test_critical_firing_triggers_incident_response(alert_env, served_incident_response):
    """The real event path: kmpops.alert.firing -> DeploymentEventTrigger -> flow run."""
    from flows.evaluate_alerts import evaluate_alerts
    from tasks.common import records

    alert_env(
        {
            "outage": {
                "threshold": 0.5,
                "duration": "0s",
                "severity": "critical",
                "query": "vector(1)",
            }
        },
        ack_timeout="1s",
    )
    (summary,) = evaluate_alerts(rules=["outage"], start_incidents="event")
    assert summary["changes"][-1] == "outage{}: pending -> firing"
    # the outage ends: the triggered run's recovery phase sees the alert resolve
    alert_env(
        {
            "outage": {
                "threshold": 0.5,
                "duration": "0s",
                "severity": "critical",
                "query": "vector(0)",
            }
        },
        ack_timeout="1s",
    )
    runs, done = wait_for_deployment_run(served_incident_response)
    assert done and done[0].state.is_completed(), [r.state for r in runs]
    assert done[0].parameters["alert"]["rule"] == "outage"
    (incident,) = records().incidents()
    assert incident.alert_key == "outage{}" and incident.severity == "critical"
    assert incident.state == "closed"
    lines = [e.message for e in records().incident(incident.id)[1]]
    assert "unacknowledged after L3" in lines and "alert outage{} resolved" in lines


def test_alertmanager_webhook_triggers_incident_response(alert_env, served_incident_response):
    """A site's Alertmanager drives kmp-ops: webhook POST -> receiver -> event -> flow run."""
    import json
    import urllib.request

    from deployments.alertmanager_receiver import emit_firing
    from kmpops.alertmanager import AlertmanagerReceiver
    from tasks.common import records

    payload = {
        "version": "4",
        "status": "firing",
        "receiver": "kmp-ops",
        "groupKey": '{}:{alertname="HighErrorRate"}',
        "groupLabels": {"alertname": "HighErrorRate"},
        "commonLabels": {"alertname": "HighErrorRate", "severity": "critical", "job": "web"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "truncatedAlerts": 0,
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "HighErrorRate", "severity": "critical", "job": "web"},
                "annotations": {"value": "0.31"},
                "startsAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "5f0c1e2d3c4b5a69",
            },
            {
                "status": "firing",
                "labels": {"alertname": "DiskAlmostFull", "severity": "warning"},
                "annotations": {},
                "startsAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": "0000000000000002",
            },
        ],
    }
    with AlertmanagerReceiver(emit_firing) as receiver:
        req = urllib.request.Request(receiver.url, data=json.dumps(payload).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    runs, done = wait_for_deployment_run(served_incident_response)
    assert len(runs) == 1  # the warning alert opened nothing
    assert done and done[0].state.is_completed(), [r.state for r in runs]
    (incident,) = records().incidents()
    assert incident.alert_key == 'HighErrorRate{job="web",severity="critical"}'
    assert incident.details["source"] == "alertmanager" and incident.details["value"] == 0.31
