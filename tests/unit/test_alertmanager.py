"""The Alertmanager webhook receiver: real HTTP POSTs of real Alertmanager payloads."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime

import pytest

from kmpops.alertmanager import AlertmanagerReceiver, AlertNotice, PayloadError, parse_payload

# What Alertmanager 0.25 sends to a webhook_configs receiver (version 4), verbatim in shape.
PAYLOAD = {
    "receiver": "kmp-ops",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "error_rate",
                "instance": "127.0.0.1:17501",
                "job": "web",
                "severity": "critical",
            },
            "annotations": {"summary": "5xx ratio above 1%", "value": "0.2931"},
            "startsAt": "2026-11-27T12:00:03.123456789Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
            "fingerprint": "a1b2c3d4e5f60708",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "high_cpu", "instance": "127.0.0.1:17502"},
            "annotations": {},
            "startsAt": "2026-11-27T11:00:00Z",
            "endsAt": "2026-11-27T11:30:00Z",
            "generatorURL": "",
            "fingerprint": "0000000000000001",
        },
    ],
    "groupLabels": {"alertname": "error_rate"},
    "commonLabels": {"job": "web"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "version": "4",
    "groupKey": '{}:{alertname="error_rate"}',
    "truncatedAlerts": 0,
}


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def received():
    got: list[list[AlertNotice]] = []
    event = threading.Event()

    def callback(notices: list[AlertNotice]) -> None:
        got.append(notices)
        event.set()

    with AlertmanagerReceiver(callback) as receiver:
        yield receiver, got


def test_parse_payload():
    notices = parse_payload(PAYLOAD)
    first, second = notices
    assert first.rule == "error_rate" and first.status == "firing"
    assert first.severity == "critical" and first.value == pytest.approx(0.2931)
    assert first.starts_at == datetime(2026, 11, 27, 12, 0, 3, 123456, tzinfo=UTC)
    assert first.ends_at is None
    assert first.payload()["labels"] == {
        "instance": "127.0.0.1:17501",
        "job": "web",
        "severity": "critical",
    }
    assert second.severity == "warning" and second.status == "resolved" and second.value is None


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"version": "3", "alerts": []},
        {"version": "4"},
        {"version": "4", "alerts": [{"labels": {}, "status": "firing"}]},
        {"version": "4", "alerts": [{"labels": {"alertname": "x"}, "status": "weird"}]},
        {"version": "4", "alerts": ["x"]},
    ],
)
def test_parse_payload_rejects(bad):
    with pytest.raises(PayloadError):
        parse_payload(bad)


def test_post_reaches_callback(received):
    receiver, got = received
    status, body = post(receiver.url, json.dumps(PAYLOAD).encode())
    assert (status, body) == (200, {"status": "ok", "alerts": 2})
    assert [n.rule for n in got[0]] == ["error_rate", "high_cpu"]
    assert receiver.received == 2


def test_bad_requests_do_not_reach_callback(received):
    receiver, got = received
    assert post(receiver.url, b"{not json")[0] == 400
    assert post(receiver.url, json.dumps({"version": "4"}).encode())[0] == 400
    base = receiver.url.rsplit("/", 1)[0]
    assert post(base + "/elsewhere", json.dumps(PAYLOAD).encode())[0] == 404
    assert got == []


def test_token_and_callback_failure():
    def boom(notices: list[AlertNotice]) -> None:
        raise RuntimeError("secret detail")

    with AlertmanagerReceiver(boom, token="s3cret-token") as receiver:
        body = json.dumps(PAYLOAD).encode()
        assert post(receiver.url, body)[0] == 401
        assert post(receiver.url, body, {"Authorization": "Bearer wrong"})[0] == 401
        status, answer = post(receiver.url, body, {"Authorization": "Bearer s3cret-token"})
        assert status == 500 and "secret detail" not in json.dumps(answer)


def test_body_limit():
    with AlertmanagerReceiver(lambda n: None, max_body=100) as receiver:
        assert post(receiver.url, json.dumps(PAYLOAD).encode())[0] == 413


def test_without_a_token_only_on_loopback():
    with pytest.raises(ValueError, match=r"unauthenticated alerts on 0\.0\.0\.0"):
        AlertmanagerReceiver(lambda n: None, host="0.0.0.0")
    with pytest.raises(ValueError, match="token is empty"):
        AlertmanagerReceiver(lambda n: None, token="  ")


@pytest.mark.parametrize(
    ("text", "limit", "deeper"),
    [
        (b"[]", 1, False),
        (b"[[]]", 1, True),
        (b'{"a": {"b": [1, 2]}}', 3, False),
        (b'{"a": {"b": [1, 2]}}', 2, True),
        (b'["[[[[[[", "\\"[[[["]', 1, False),  # brackets inside strings do not count
        (b"[" * 100_000, 32, True),
    ],
)
def test_json_depth(text, limit, deeper):
    from kmpops.alertmanager import json_depth_exceeds

    assert json_depth_exceeds(text, limit) is deeper


def test_nested_json_is_a_400_and_the_receiver_goes_on(received):
    receiver, got = received
    status, body = post(receiver.url, b"[" * 200_000)
    assert status == 400 and body == {"error": "JSON nested deeper than 32 levels"}
    assert post(receiver.url, json.dumps(PAYLOAD).encode())[0] == 200
    assert len(got) == 1


def test_a_silent_connection_is_closed():
    import socket

    with AlertmanagerReceiver(lambda n: None, request_timeout=0.5) as receiver:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
            sock.sendall(b"POST /alertmanager HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
