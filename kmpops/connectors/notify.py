"""Notifications: severity-routed messages to apprise URLs and to our own JSON-lines file sink.

Routes map a severity (``critical``, ``warning``, ``info``) to URLs. ``jsonl:///abs/path.jsonl``
appends one JSON object per message (``ts``, ``severity``, ``title``, ``body``, ``tags``,
``dedup_key``); any other URL goes through apprise (imported on first use). Title, body and tags
pass through the redactor before they leave the process; delivery reports show URLs with their
secrets masked.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kmpops.redact import Redactor, get_redactor

__all__ = ["SEVERITIES", "Delivery", "Notifier", "mask_url", "read_sink"]

SEVERITIES = ("critical", "warning", "info")
_SINK_SCHEME = "jsonl://"
_sink_lock = threading.Lock()


@dataclass(frozen=True)
class Delivery:
    """The outcome of one message on one route: ``url`` has its secrets masked."""

    url: str
    ok: bool
    error: str | None = None


def _check_severity(severity: str) -> str:
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; known: {', '.join(SEVERITIES)}")
    return severity


def _sink_path(url: str) -> Path:
    """The file of a ``jsonl:///abs/path`` URL; ValueError if the path is not absolute."""
    path = url[len(_SINK_SCHEME) :]
    if not path.startswith("/") or "\x00" in path:
        raise ValueError(f"a jsonl sink needs an absolute path (jsonl:///abs/file.jsonl): {url!r}")
    return Path(path)


def mask_url(url: str) -> str:
    """``url`` fit for logs and records: apprise's privacy form, else passwords masked."""
    if url.startswith(_SINK_SCHEME):
        return url
    try:
        import apprise

        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    except Exception:
        plugin = None
    if plugin is not None:
        private = str(plugin.url(privacy=True))
        return private.split("?", 1)[0] if "?" not in url else private
    masked = get_redactor().redact(url)
    scheme, sep, _ = masked.partition("://")
    return f"{scheme}://***" if sep and masked == url and "@" in url else masked


def _append_sink(path: Path, record: Mapping[str, Any]) -> None:
    """Append one line with a single O_APPEND write, so concurrent writers never interleave."""
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sink_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_sink(path: Path | str) -> list[dict[str, Any]]:
    """The messages of a jsonl sink, oldest first; ``[]`` if the file does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Notifier:
    """Sends messages to the URLs routed for their severity.

    Construction validates the severities and jsonl paths (ValueError); apprise URLs are checked
    when used, so one bad URL only fails its own deliveries.
    """

    def __init__(
        self, routes: Mapping[str, Sequence[str]], *, redactor: Redactor | None = None
    ) -> None:
        self.routes: dict[str, list[str]] = {}
        for severity, urls in routes.items():
            _check_severity(severity)
            if isinstance(urls, str):
                raise ValueError(f"routes[{severity!r}] must be a list of URLs")
            for url in urls:
                if url.startswith(_SINK_SCHEME):
                    _sink_path(url)
            self.routes[severity] = list(dict.fromkeys(urls))
        self._redactor = redactor

    @property
    def redactor(self) -> Redactor:
        return self._redactor if self._redactor is not None else get_redactor()

    def __repr__(self) -> str:
        routes = {k: [mask_url(u) for u in v] for k, v in self.routes.items()}
        return f"Notifier({routes!r})"

    def send(
        self,
        *,
        severity: str,
        title: str,
        body: str,
        tags: Sequence[str] = (),
        dedup_key: str | None = None,
    ) -> list[Delivery]:
        """Deliver one message to every URL routed for ``severity``; one Delivery per URL.

        Raises ValueError for an unknown severity (listing the known ones). Never raises for a
        failed delivery: it is reported as ``ok=False`` with the (redacted) reason, and the other
        URLs are still tried. A severity without routes delivers nowhere and returns ``[]``.
        """
        _check_severity(severity)
        red = self.redactor.redact
        message = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "severity": severity,
            "title": red(title),
            "body": red(body),
            "tags": [red(str(t)) for t in tags],
            "dedup_key": red(dedup_key) if dedup_key is not None else None,
        }
        deliveries = []
        for url in self.routes.get(severity, []):
            try:
                if url.startswith(_SINK_SCHEME):
                    _append_sink(_sink_path(url), message)
                    deliveries.append(Delivery(url, True))
                else:
                    deliveries.append(self._apprise(url, message))
            except Exception as err:
                deliveries.append(
                    Delivery(mask_url(url), False, red(f"{type(err).__name__}: {err}"))
                )
        return deliveries

    def _apprise(self, url: str, message: Mapping[str, Any]) -> Delivery:
        import apprise

        masked = mask_url(url)
        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
        if plugin is None:
            return Delivery(masked, False, "not a supported apprise URL")
        notify_type = {
            "critical": apprise.NotifyType.FAILURE,
            "warning": apprise.NotifyType.WARNING,
            "info": apprise.NotifyType.INFO,
        }[message["severity"]]
        body = message["body"]
        if message["tags"]:
            body = f"{body}\n\ntags: {', '.join(message['tags'])}"
        if message["dedup_key"]:
            body = f"{body}\ndedup_key: {message['dedup_key']}"
        with apprise.LogCapture(level=apprise.logging.WARNING) as captured:
            ok = bool(plugin.notify(title=message["title"], body=body, notify_type=notify_type))
        if ok:
            return Delivery(masked, True)
        reason = " ".join(
            line.split(" - ", 2)[-1] for line in captured.getvalue().strip().splitlines()
        )
        error = self.redactor.redact(reason or "apprise reported a failure")
        return Delivery(masked, False, error.replace(url, masked))
