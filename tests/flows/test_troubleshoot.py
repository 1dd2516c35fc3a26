"""troubleshoot on the real stack: a filled host root, a crashed service, a healthy service."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from flows.troubleshoot import TroubleshootRequest, troubleshoot
from kmpops.plans.diagnosis import Thresholds
from tests.flows.ops_variant import ops_yaml_variant

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def variant(monkeypatch, stack, tmp_path):
    return ops_yaml_variant(stack, tmp_path, monkeypatch)


def add_service(data: dict, name: str, port: int) -> None:
    data["services"][name] = {
        "deploy_path": "{root}/srv/" + name,
        "restart": "{deploy_path}/current/control restart",
        "health_check": {"url": f"http://{{address}}:{port}/health", "timeout": 2},
        "logs": {"app": "{deploy_path}/shared/log/web.log"},
    }


def used_mb(root: str) -> float:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) / 2**20


def test_filled_host_root_is_a_disk_finding_on_that_host_only(stack) -> None:
    full, other = stack.hosts[2], stack.hosts[3]
    budget = int(max(used_mb(full.root), used_mb(other.root))) + 20
    dump_mb = int(budget - used_mb(full.root)) + 10
    dump = Path(full.root) / "srv" / "forgotten-dump.bin"
    with open(dump, "wb") as fh:
        for _ in range(dump_mb):
            fh.write(b"\x01" * (1024 * 1024))
    try:
        result = troubleshoot(
            TroubleshootRequest(
                hosts=[full.name, other.name],
                service=None,
                symptom="disk alarm",
                thresholds=Thresholds(root_budget_mb=budget),
            )
        )
    finally:
        dump.unlink()
    disk = [f for f in result["findings"] if f["issue"] == "disk-space"]
    assert [f["host"] for f in disk] == [full.name]
    assert disk[0]["severity"] == "critical"
    assert "forgotten-dump.bin" in disk[0]["evidence"]
    assert any("prune" in s or "rotate" in s for s in disk[0]["next_steps"])
    assert result["level"] in ("L2", "L3")


def test_crashed_and_healthy_services(stack, variant, tmp_path) -> None:
    from kmpops.stack.sample_service import build_release, install_release

    crashed, healthy = stack.hosts[0], stack.hosts[1]
    ghost_port, probe_port = free_port(), free_port()

    def mutate(data: dict) -> None:
        add_service(data, "ghost", ghost_port)
        add_service(data, "probe", probe_port)

    variant(mutate)
    ghost_log = Path(crashed.root) / "srv" / "ghost" / "shared" / "log" / "web.log"
    ghost_log.parent.mkdir(parents=True, exist_ok=True)
    ghost_log.write_text(
        "INFO serving\nTraceback (most recent call last):\n  File app.py\nMemoryError\n"
    )
    deploy = Path(healthy.root) / "srv" / "probe"
    install_release(build_release("9.9.9", tmp_path), deploy)
    control = deploy / "current" / "control"
    subprocess.run([str(control), "start", "--port", str(probe_port)], check=True, timeout=30)
    try:
        down = troubleshoot(
            TroubleshootRequest(hosts=[crashed.name], service="ghost", log="app", symptom="500s")
        )
        up = troubleshoot(TroubleshootRequest(hosts=[healthy.name], service="probe"))
    finally:
        subprocess.run([str(control), "stop"], check=False, timeout=30)
    crash = [f for f in down["findings"] if f["issue"] == "crash"]
    assert crash and crash[0]["severity"] == "critical"
    assert "MemoryError" in crash[0]["evidence"]
    assert down["level"] == "L3"
    app_issues = {"crash", "service-failure", "timeout", "network", "errors"}
    assert not [f for f in up["findings"] if f["issue"] in app_issues], up["findings"]

    from tasks.common import records

    last = records().audit_events(action="troubleshoot.diagnosis")[-1]
    assert last.details["level"] in ("none", "L1", "L2", "L3")
    assert last.details["hosts"] == [healthy.name]


def test_unknown_host_is_refused_before_any_work(stack) -> None:
    with pytest.raises(KeyError, match="unknown host"):
        troubleshoot(TroubleshootRequest(hosts=["nope-1"]))
