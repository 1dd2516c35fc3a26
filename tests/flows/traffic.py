"""A shared helper for flow tests: the users of an environment, as a steady trickle of requests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def user_traffic(stack: Any, environment: str = "production") -> Iterator[None]:
    """While the block runs, send a few requests to each host of ``environment`` every 50 ms
    (what a production analysis judges; staging gets its traffic from its own tests)."""
    from kmpops.connectors.traffic import send_traffic

    stop = threading.Event()
    hosts = [h for h in stack.hosts if h.environment == environment]

    def run() -> None:
        while not stop.is_set():
            for h in hosts:
                send_traffic(
                    f"http://127.0.0.1:{h.web_port}/work", requests=3, concurrency=1, timeout=1
                )
            stop.wait(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
