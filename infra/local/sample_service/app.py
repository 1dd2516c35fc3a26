#!/usr/bin/env python3
"""The sample web service that kmp-ops deploys: stdlib only, one file, Python 3.10+.

Endpoints: ``/`` and ``/work`` (counted requests), ``/health`` (200 + JSON, 503 when the release
is the "unhealthy" variant or the instance is drained: ``<deploy>/shared/drain`` exists),
``/version``, ``/metrics`` (Prometheus text format 0.0.4).

The release directory holds ``VERSION`` and ``variant``. Variants, for rollback tests:
  good                healthy, no errors
  unhealthy           /health answers 503
  errors [RATIO]      healthy, but RATIO (default 0.3) of requests to / and /work answer 500
  slow [SECONDS]      healthy, / and /work take SECONDS (default 0.3) longer
Errors are deterministic: exactly floor(n * RATIO) of the first n counted requests fail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `control drain` creates it: /health answers 503, so a load balancer takes the instance out.
DRAIN_FILE = HERE.parent.parent / "shared" / "drain"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
APP_PATHS = ("/", "/work")


def read_release(directory: Path) -> tuple[str, str, float]:
    """(version, variant name, variant parameter) from the release directory's files."""
    try:
        version = (directory / "VERSION").read_text().strip() or "unknown"
    except OSError:
        version = "unknown"
    try:
        words = (directory / "variant").read_text().split()
    except OSError:
        words = []
    name = words[0] if words else "good"
    defaults = {"errors": 0.3, "slow": 0.3}
    if name not in ("good", "unhealthy", "errors", "slow"):
        raise SystemExit(f"unknown variant {name!r} in {directory / 'variant'}")
    param = float(words[1]) if len(words) > 1 else defaults.get(name, 0.0)
    return version, name, param


class Metrics:
    """Counters and a latency histogram, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.errors = 0
        self.counted = 0
        self.bucket_counts = [0] * len(BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.started = time.time()

    def next_request_fails(self, ratio: float) -> bool:
        """Deterministic share of failures: request n fails when floor(n*r) > floor((n-1)*r)."""
        with self.lock:
            self.counted += 1
            n = self.counted
        return ratio > 0 and int(n * ratio) > int((n - 1) * ratio)

    def observe(self, handler: str, code: int, seconds: float) -> None:
        with self.lock:
            key = (handler, str(code))
            self.requests[key] = self.requests.get(key, 0) + 1
            if code >= 500:
                self.errors += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.bucket_counts[i] += 1
            self.duration_sum += seconds
            self.duration_count += 1

    def render(self, version: str, variant: str) -> str:
        with self.lock:
            requests = dict(self.requests)
            errors = self.errors
            buckets = list(self.bucket_counts)
            dsum, dcount = self.duration_sum, self.duration_count
        lines = [
            "# HELP web_requests_total Requests to / and /work by handler and status code.",
            "# TYPE web_requests_total counter",
        ]
        if not requests:
            lines.append('web_requests_total{handler="/",code="200"} 0')
        for (handler, code), count in sorted(requests.items()):
            lines.append(f'web_requests_total{{handler="{handler}",code="{code}"}} {count}')
        lines += [
            "# HELP web_errors_total Requests to / and /work that answered 5xx.",
            "# TYPE web_errors_total counter",
            f"web_errors_total {errors}",
            "# HELP web_request_duration_seconds Latency of requests to / and /work.",
            "# TYPE web_request_duration_seconds histogram",
        ]
        for bound, count in zip(BUCKETS, buckets, strict=True):
            lines.append(f'web_request_duration_seconds_bucket{{le="{bound}"}} {count}')
        lines += [
            f'web_request_duration_seconds_bucket{{le="+Inf"}} {dcount}',
            f"web_request_duration_seconds_sum {dsum:.6f}",
            f"web_request_duration_seconds_count {dcount}",
            "# HELP web_version_info The running release.",
            "# TYPE web_version_info gauge",
            f'web_version_info{{version="{_esc(version)}",variant="{_esc(variant)}"}} 1',
            "# HELP process_cpu_seconds_total User and system CPU time spent in seconds.",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {sum(os.times()[:2]):.2f}",
            "# HELP process_start_time_seconds Start time of the process since unix epoch.",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {self.started:.3f}",
        ]
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Handler(BaseHTTPRequestHandler):
    server_version = "kmp-sample/1"
    protocol_version = "HTTP/1.1"
    # Headers and body in one segment: with Nagle + delayed ACK every answer would wait 40 ms.
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024

    # Set on the class by main().
    version = "unknown"
    variant = "good"
    param = 0.0
    metrics: Metrics

    def log_message(self, format: str, *args: object) -> None:
        pass  # no access log: traffic tests would fill the disk

    def _send(self, code: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in APP_PATHS:
            self._app(path)
        elif path == "/health":
            draining = DRAIN_FILE.exists()
            healthy = self.variant != "unhealthy" and not draining
            body = {
                "status": "draining" if draining else "ok" if healthy else "unhealthy",
                "version": self.version,
                "variant": self.variant,
                "pid": os.getpid(),
            }
            self._send(200 if healthy else 503, json.dumps(body) + "\n")
        elif path == "/version":
            self._send(200, json.dumps({"version": self.version, "variant": self.variant}) + "\n")
        elif path == "/metrics":
            self._send(
                200,
                self.metrics.render(self.version, self.variant),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        else:
            self._send(404, json.dumps({"error": "not found", "path": path}) + "\n")

    do_HEAD = do_GET

    def _app(self, path: str) -> None:
        started = time.perf_counter()
        if self.variant == "slow":
            time.sleep(self.param)
        if self.variant == "errors" and self.metrics.next_request_fails(self.param):
            code, body = 500, {"error": "injected failure", "version": self.version}
        else:
            code, body = 200, {"ok": True, "path": path, "version": self.version}
        self.metrics.observe(path, code, time.perf_counter() - started)
        if code >= 500:  # what a real service logs; deploy analysis counts these lines
            print(f"ERROR {path} answered {code}: injected failure", file=sys.stderr, flush=True)
        self._send(code, json.dumps(body) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--pid-file", type=Path, default=None)
    args = parser.parse_args(argv)

    version, variant, param = read_release(HERE)
    Handler.version, Handler.variant, Handler.param = version, variant, param
    Handler.metrics = Metrics()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.pid_file is not None:  # atomically: `control` may be reading it right now
        tmp = args.pid_file.with_name(f"{args.pid_file.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, args.pid_file)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)  # leaves serve_forever at once; no wait for its poll interval

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"web {version} ({variant}) listening on {args.host}:{args.port} pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
    print(f"web {version} stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
