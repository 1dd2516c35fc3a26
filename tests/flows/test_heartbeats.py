"""Flow-run heartbeats through ``tasks.heartbeats``: still sent, and stopped when the run ends.

The end-to-end consequence (a killed worker's deploy is marked Crashed because its heartbeats
stop, then recovered) is ``tests/integration/test_workers.py``; the time saved at exit is
measured by ``bench/bench_deploy.py`` (Completed vs call returned), not asserted here.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import httpx
from prefect import flow

import tasks  # noqa: F401  (installs the heartbeats)
from tasks import heartbeats

API = os.environ["PREFECT_API_URL"]
WAIT_S = 60  # events reach the server through Prefect's events worker, asynchronously


@flow(name="kmpops-test-heartbeat")
def beating(hold_s: float) -> str:
    time.sleep(hold_s)
    return "done"


def heartbeat_events(run_id: str) -> list[dict[str, Any]]:
    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        },
        "limit": 50,
    }
    response = httpx.post(f"{API}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    return list(response.json()["events"])


def test_importing_tasks_puts_kmpops_heartbeats_in_prefects_engine() -> None:
    import prefect.flow_engine

    assert heartbeats.installed()
    assert prefect.flow_engine._send_heartbeats is heartbeats.send_heartbeats
    assert heartbeats.install() is True  # idempotent


def test_a_run_sends_its_heartbeat_and_leaves_no_heartbeat_thread() -> None:
    state = beating(0.2, return_state=True)
    assert state.result() == "done"
    run_id = str(state.state_details.flow_run_id)
    # the block's exit stopped and joined the thread before the call returned
    assert not [t for t in threading.enumerate() if t.name == "kmpops-heartbeat"]
    deadline = time.monotonic() + WAIT_S
    events = heartbeat_events(run_id)
    while not events and time.monotonic() < deadline:
        time.sleep(0.5)
        events = heartbeat_events(run_id)
    # one at the start (the next is due after the 180 s period, long after this run ended)
    assert len(events) == 1, events
    related = {r["prefect.resource.role"]: r for r in events[0]["related"]}
    assert related["flow"]["prefect.resource.name"] == "kmpops-test-heartbeat"


def test_an_engine_of_another_shape_keeps_prefects_heartbeats() -> None:
    import types

    import prefect.flow_engine as real

    def one_parameter(engine: object) -> None:
        raise AssertionError("never called")

    shaped = types.SimpleNamespace(
        _send_heartbeats=one_parameter,
        MINIMUM_HEARTBEAT_INTERVAL=real.MINIMUM_HEARTBEAT_INTERVAL,
        BaseFlowRunEngine=real.BaseFlowRunEngine,
    )
    assert heartbeats._compatible(shaped) is False
    shaped._send_heartbeats = heartbeats.send_heartbeats  # the shape Prefect 3.9's has
    assert heartbeats._compatible(shaped) is True
    shaped.BaseFlowRunEngine = object  # no heartbeat methods on the engine
    assert heartbeats._compatible(shaped) is False
