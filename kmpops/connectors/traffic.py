"""Test traffic: a bounded number of GETs to a loopback URL, counted by answer status.

What the deploy pipeline's integration-tests stage sends to staging (a service's configured
traffic profile) so its analysis has data. Loopback only (like performance-test's load), every
request has a timeout, and failed connections are counted (``"failed"``), never raised.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

from kmpops.errors import UnsafeValueError

__all__ = ["MAX_CONCURRENCY", "MAX_REQUESTS", "TrafficResult", "send_traffic"]

MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 64
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class TrafficResult:
    """How many requests got which answer (``"failed"``: no answer), and the wall time."""

    url: str
    codes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def unexpected(self, expect_status: list[int]) -> dict[str, int]:
        """The answers outside ``expect_status`` (failed connections included)."""
        allowed = {str(s) for s in expect_status}
        return {code: n for code, n in self.codes.items() if code not in allowed}

    def describe(self) -> str:
        """``GET <url>: 200 x 97, 500 x 3 in 0.4s``."""
        counts = ", ".join(f"{c} x {n}" for c, n in sorted(self.codes.items()))
        return f"GET {self.url}: {counts or 'nothing sent'} in {self.seconds:.2f}s"


def send_traffic(url: str, *, requests: int, concurrency: int, timeout: float) -> TrafficResult:
    """Send ``requests`` GETs to a loopback http ``url`` over ``concurrency`` keep-alive
    connections; each request times out after ``timeout`` seconds.

    Raises UnsafeValueError for a URL that is not http on loopback, ValueError for counts out of
    range (before anything is sent). Never raises for a failed request: it is counted."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
        raise UnsafeValueError(f"test traffic only goes to http on loopback, not {url!r}")
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests must be between 1 and {MAX_REQUESTS}, got {requests}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    remaining = [requests]
    lock = threading.Lock()
    codes: Counter[str] = Counter()

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def worker() -> None:
        mine: Counter[str] = Counter()
        conn: http.client.HTTPConnection | None = None
        while take():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                mine[str(response.status)] += 1
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                mine["failed"] += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            codes.update(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return TrafficResult(url, dict(sorted(codes.items())), time.perf_counter() - started)
