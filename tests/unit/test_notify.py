"""Notifier: jsonl file sink, real apprise deliveries to a local HTTP receiver, redaction."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kmpops.connectors.notify import Notifier, mask_url, read_sink
from kmpops.redact import Redactor

RECEIVER_PORT = 24601
DEAD_PORT = 24602  # nothing listens here


@pytest.fixture
def receiver() -> Iterator[list[dict]]:
    """A webhook receiver on 127.0.0.1 that records the JSON apprise posts."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            received.append(
                {
                    "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    **json.loads(self.rfile.read(length)),
                }
            )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", RECEIVER_PORT), Hook)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield received
    server.shutdown()
    server.server_close()


def test_jsonl_sink_appends_one_object_per_message(tmp_path: Path) -> None:
    sink = tmp_path / "n" / "notifications.jsonl"
    notifier = Notifier({"critical": [f"jsonl://{sink}"], "info": [f"jsonl://{sink}"]})
    [delivery] = notifier.send(
        severity="critical",
        title="web down",
        body="3 of 4 hosts",
        tags=["web", "prod"],
        dedup_key="web-down",
    )
    assert delivery.ok and delivery.error is None and delivery.url == f"jsonl://{sink}"
    notifier.send(severity="info", title="fine again", body="")
    assert notifier.send(severity="warning", title="x", body="y") == []  # no route
    messages = read_sink(sink)
    assert [m["title"] for m in messages] == ["web down", "fine again"]
    assert set(messages[0]) == {"ts", "severity", "title", "body", "tags", "dedup_key"}
    assert messages[0]["tags"] == ["web", "prod"] and messages[0]["dedup_key"] == "web-down"
    assert messages[0]["ts"].endswith("Z")


def test_unknown_severity_lists_known_ones(tmp_path: Path) -> None:
    notifier = Notifier({"info": [f"jsonl://{tmp_path}/a.jsonl"]})
    with pytest.raises(ValueError, match="known: critical, warning, info"):
        notifier.send(severity="page", title="t", body="b")
    with pytest.raises(ValueError, match="known: critical, warning, info"):
        Notifier({"urgent": []})
    with pytest.raises(ValueError, match="absolute path"):
        Notifier({"info": ["jsonl://relative.jsonl"]})


def test_secrets_are_redacted_before_leaving(tmp_path: Path, receiver: list[dict]) -> None:
    sink = tmp_path / "s.jsonl"
    redactor = Redactor(["db-pass-123"])
    notifier = Notifier(
        {"warning": [f"jsonl://{sink}", f"json://127.0.0.1:{RECEIVER_PORT}/hook"]},
        redactor=redactor,
    )
    deliveries = notifier.send(
        severity="warning",
        title="restore used db-pass-123",
        body="url postgresql://app:db-pass-123@db/app token=abcdef",
        tags=["password=x1y2z3"],
    )
    assert all(d.ok for d in deliveries), deliveries
    stored = json.dumps(read_sink(sink)) + json.dumps(receiver)
    for secret in ("db-pass-123", "abcdef", "x1y2z3"):
        assert secret not in stored
    assert receiver[0]["title"] == "restore used ***"


def test_failing_apprise_url_does_not_stop_others(tmp_path: Path, receiver: list[dict]) -> None:
    sink = tmp_path / "s.jsonl"
    notifier = Notifier(
        {
            "critical": [
                f"json://ops:hookpass@127.0.0.1:{DEAD_PORT}/x",
                "notaservice://whatever",
                f"jsonl://{sink}",
                f"json://ops:hookpass@127.0.0.1:{RECEIVER_PORT}/alerts",
            ]
        }
    )
    deliveries = notifier.send(severity="critical", title="disk full", body="/var 98%")
    assert [d.ok for d in deliveries] == [False, False, True, True]
    dead, unsupported = deliveries[0], deliveries[1]
    assert "hookpass" not in dead.url and "hookpass" not in (dead.error or "")
    assert dead.url == f"json://ops:****@127.0.0.1:{DEAD_PORT}/x"
    assert "connection" in (dead.error or "").lower()
    assert unsupported.error == "not a supported apprise URL"
    assert len(read_sink(sink)) == 1
    [posted] = receiver
    assert posted["path"] == "/alerts" and posted["title"] == "disk full"
    assert posted["type"] == "failure" and posted["auth"].startswith("Basic ")
    assert "hookpass" not in repr(notifier)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("jsonl:///var/x.jsonl", "jsonl:///var/x.jsonl"),
        ("mailto://ops:s3cret@example.org", "mailto://ops:****@example.org/"),
        ("unknown://user:pw12@host/x", "unknown://user:***@host/x"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
