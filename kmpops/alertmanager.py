"""A small Alertmanager webhook receiver: payloads in, parsed alerts to a callback.

A site that already runs Prometheus Alertmanager points a ``webhook_configs`` receiver at it::

    receivers:
      - name: kmp-ops
        webhook_configs:
          - url: http://127.0.0.1:17600/alertmanager
            send_resolved: true
            http_config: {authorization: {credentials_file: /etc/alertmanager/kmpops-token}}

and runs ``python deployments/alertmanager_receiver.py`` (which emits the same
``kmpops.alert.firing`` Prefect event as ``evaluate-alerts``). This module has no Prefect in it:
:class:`AlertmanagerReceiver` takes a ``callback(list[AlertNotice])``.

Answers: 200 after the callback returned, 400 for a payload that is not an Alertmanager webhook
message or is JSON nested deeper than ``max_depth`` (the callback is not called), 401 for a
missing/wrong bearer token, 404 for another path, 408 when the body does not arrive within
``request_timeout``, 413 above ``max_body`` bytes, 500 if the callback raised (Alertmanager
retries). Only the error class reaches the answer, never payload contents or the token.

Bounded: every connection has a socket timeout (``request_timeout``: a client that stops
sending is cut off), the body has a size limit and a nesting limit (checked before parsing, so
``[[[[…`` cannot exhaust the parser). Without a token the receiver only binds to a loopback
address (``allow_unauthenticated``), for development.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "AlertNotice",
    "AlertmanagerReceiver",
    "PayloadError",
    "is_loopback",
    "json_depth_exceeds",
    "parse_payload",
]

log = logging.getLogger("kmpops.alertmanager")

MAX_BODY = 1 << 20
MAX_DEPTH = 32
REQUEST_TIMEOUT_S = 10.0
PATHS = ("/", "/alertmanager", "/webhook")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON text ``raw`` nests arrays/objects deeper than ``limit`` (strings and
    their escapes are skipped). Linear, no recursion: safe on any input."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class PayloadError(ValueError):
    """The body is not an Alertmanager webhook message (version 4)."""


@dataclass(frozen=True)
class AlertNotice:
    """One alert of a webhook message, in kmp-ops' terms."""

    rule: str
    status: str
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    value: float | None = None
    fingerprint: str = ""
    generator_url: str = ""

    def payload(self) -> dict[str, Any]:
        """The JSON-safe event payload (same shape as evaluate-alerts' ``kmpops.alert.firing``)."""
        return {
            "rule": self.rule,
            "labels": {k: v for k, v in self.labels.items() if k != "alertname"},
            "value": self.value,
            "severity": self.severity,
            "status": self.status,
            "active_since": self.starts_at.isoformat() if self.starts_at else None,
            "source": "alertmanager",
            "fingerprint": self.fingerprint,
        }


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _value(annotations: Mapping[str, str]) -> float | None:
    raw = annotations.get("value")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be an object")
    return {str(k): str(v) for k, v in value.items()}


def parse_payload(data: Any) -> list[AlertNotice]:
    """The alerts of an Alertmanager webhook message (``version: "4"``).

    ``rule`` is the ``alertname`` label, ``severity`` the ``severity`` label (default
    ``warning``), ``value`` the ``value`` annotation if it is a number. Raises PayloadError
    for anything else (not an object, other version, missing/invalid ``alerts``).
    """
    if not isinstance(data, dict):
        raise PayloadError("expected a JSON object")
    if str(data.get("version", "")) != "4":
        raise PayloadError(f"unsupported webhook version {data.get('version')!r}")
    alerts = data.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts must be a list")
    out = []
    for i, item in enumerate(alerts):
        if not isinstance(item, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        labels = _str_map(item.get("labels"), f"alerts[{i}].labels")
        annotations = _str_map(item.get("annotations"), f"alerts[{i}].annotations")
        rule = labels.get("alertname")
        if not rule:
            raise PayloadError(f"alerts[{i}] has no alertname label")
        status = str(item.get("status") or data.get("status") or "")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"alerts[{i}].status must be firing or resolved")
        out.append(
            AlertNotice(
                rule=rule,
                status=status,
                severity=labels.get("severity", "warning"),
                labels=labels,
                annotations=annotations,
                starts_at=_time(item.get("startsAt")),
                ends_at=_time(item.get("endsAt")),
                value=_value(annotations),
                fingerprint=str(item.get("fingerprint") or ""),
                generator_url=str(item.get("generatorURL") or ""),
            )
        )
    return out


Callback = Callable[[list[AlertNotice]], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # the socket timeout of this connection
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.split("?")[0] in ("/health", "/-/healthy"):
            self._answer(200, {"status": "ok", "received": self.server.received})
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?")[0] not in PATHS:
            self._answer(404, {"error": "not found"})
            return
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self.close_connection = True
                self._answer(401, {"error": "unauthorized"})
                return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > self.server.max_body:
            self.close_connection = True
            self._answer(413, {"error": "payload too large or without length"})
            return
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._answer(408, {"error": "request body not received in time"})
            return
        if len(raw) < length:
            self.close_connection = True
            self._answer(400, {"error": "request body shorter than its Content-Length"})
            return
        if json_depth_exceeds(raw, self.server.max_depth):
            self._answer(400, {"error": f"JSON nested deeper than {self.server.max_depth} levels"})
            return
        try:
            notices = parse_payload(json.loads(raw.decode("utf-8")))
        except (PayloadError, ValueError, RecursionError) as exc:
            self._answer(400, {"error": str(exc) if isinstance(exc, PayloadError) else "bad json"})
            return
        try:
            self.server.callback(notices)
        except Exception as exc:  # the callback's failure is Alertmanager's reason to retry
            log.warning("alertmanager callback failed: %s", type(exc).__name__)
            self._answer(500, {"error": f"callback failed: {type(exc).__name__}"})
            return
        with self.server.lock:
            self.server.received += len(notices)
        self._answer(200, {"status": "ok", "alerts": len(notices)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        callback: Callback,
        token: str | None,
        max_body: int,
        max_depth: int,
        request_timeout: float,
    ) -> None:
        super().__init__(address, _Handler)
        self.callback = callback
        self.token = token
        self.max_body = max_body
        self.max_depth = max_depth
        self.request_timeout = request_timeout
        self.received = 0
        self.lock = threading.Lock()


class AlertmanagerReceiver:
    """An HTTP server on ``host:port`` (0: any free port) passing parsed alerts to ``callback``.

    ``start()`` serves in a background thread, ``serve_forever()`` in the caller's; ``stop()``
    shuts down and closes the socket. A context manager (start/stop). ``token``: a request must
    carry ``Authorization: Bearer <token>``. Without a token (None) the receiver accepts
    anyone, so it refuses (ValueError, nothing bound) unless ``host`` is a loopback address;
    it logs a warning. An empty token is refused too. ``request_timeout`` bounds every read
    of a connection, ``max_body`` and ``max_depth`` the body.
    """

    def __init__(
        self,
        callback: Callback,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_body: int = MAX_BODY,
        max_depth: int = MAX_DEPTH,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("the receiver's token is empty")
        if token is None:
            if not is_loopback(host):
                raise ValueError(
                    f"refusing to accept unauthenticated alerts on {host}: "
                    "give a token, or bind to a loopback address"
                )
            log.warning("alertmanager receiver on %s accepts alerts WITHOUT AUTHENTICATION", host)
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self._server = _Server(
            (host, port), callback, token, max_body, max_depth, float(request_timeout)
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The webhook URL to configure in Alertmanager."""
        return f"http://{self._server.server_address[0]}:{self.port}/alertmanager"

    @property
    def received(self) -> int:
        """How many alerts were passed to the callback."""
        return self._server.received

    def start(self) -> AlertmanagerReceiver:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="alertmanager-receiver", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (or KeyboardInterrupt)."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> AlertmanagerReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
