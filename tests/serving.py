"""Tests' subprocesses that serve deployments: start one, wait until its trigger is live, stop
it by its pid (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def serve_subprocess(code: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Run ``code`` (a ``prefect.serve`` call, polling for runs every second, or a flow call) in
    a Python subprocess from the repository; its output goes to ``log_path``."""
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_for_trigger(deployment: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    """Wait until ``deployment`` ("flow/name") exists with its trigger's automation (created
    after it), then for the server's trigger engine to load it (pg NOTIFY: milliseconds).
    Raises TimeoutError, or AssertionError if the serving process exited."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            assert proc.poll() is None, f"the process serving {deployment} exited"
            try:
                dep = client.read_deployment_by_name(deployment)
                if client.read_resource_related_automations(f"prefect.deployment.{dep.id}"):
                    break
            except Exception:  # not there yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no trigger for {deployment} after {timeout:g} s")
            time.sleep(0.5)
    time.sleep(0.5)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process by pid, wait, SIGKILL if it does not exit."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
