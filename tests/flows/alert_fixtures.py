"""Helpers shared by the alerting flow tests (evaluate-alerts, incident-response)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml


def ops_yaml_writer(
    stack: Any, root: Path, monkeypatch: pytest.MonkeyPatch, *, repeat_interval: str
) -> Callable[..., Path]:
    """Point KMPOPS_CONFIG at ``root/ops.yaml`` and return ``configure(alerts, *,
    drop_prometheus=False, **notifications)``, which (re)writes it as the stack's ops.yaml with
    a records store under ``root``, every route to the jsonl sink ``configure.sink``, a 1 s ack
    timeout, ``repeat_interval`` and the ``notifications`` overrides. Writes it once with no
    alerts.
    """
    base = yaml.safe_load(Path(stack.ops_yaml).read_text())
    sink = root / "notifications.jsonl"
    path = root / "ops.yaml"

    def configure(alerts: dict, *, drop_prometheus: bool = False, **notifications: Any) -> Path:
        data = dict(base)
        data["records"] = {
            "url": f"sqlite:///{root / 'records.db'}",
            "audit_key": data["records"]["audit_key"],
        }
        routes = [f"jsonl://{sink}"]
        data["notifications"] = {
            "routes": {"critical": routes, "warning": routes, "info": routes},
            "escalation": {"L1": routes, "L2": routes, "L3": routes},
            "ack_timeout": "1s",
            "responder_tokens": base["notifications"]["responder_tokens"],
            "repeat_interval": repeat_interval,
            **notifications,
        }
        data["alerts"] = alerts
        if drop_prometheus:
            data.pop("prometheus", None)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        # the config cache is keyed by mtime: make sure a rewrite is seen
        stamp = time.time_ns() + 1_000_000
        os.utime(path, ns=(stamp, stamp))
        return path

    monkeypatch.setenv("KMPOPS_CONFIG", str(path))
    configure({})
    configure.sink = sink  # type: ignore[attr-defined]
    return configure


def wait_for_deployment_run(deployment: str, timeout: float = 90.0) -> tuple[list, list]:
    """Poll the deployment named ``deployment`` until one of its flow runs is final or
    ``timeout`` seconds passed; return ``(runs, final_runs)`` as last read.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            )
            done = [r for r in runs if r.state and r.state.is_final()]
            if done or time.monotonic() > deadline:
                return runs, done
            time.sleep(1)
