"""capacity-report, cost-report and performance-test on the real stack."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.capacity_report import CapacityRequest, capacity_report
from flows.cost_report import CostRequest, cost_report
from flows.performance_test import PerformanceRequest, performance_test
from kmpops.errors import PolicyViolation, UnsafeValueError
from kmpops.plans.capacity import CapacityThresholds, RegressionPolicy, UnitPrices

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_capacity_report_measures_every_host_and_records_samples(stack) -> None:
    from tasks.common import records

    first = capacity_report()
    hosts = {r["host"]: r for r in first["rows"]}
    assert set(hosts) == {h.name for h in stack.hosts}
    for row in hosts.values():
        assert row["cpus"] >= 1
        assert 0 < row["memory_used_pct"] < 100
        assert 0 < row["disk_used_pct"] < 100
    assert "Prometheus" in first["rate_source"]
    # a second run sees the first one's sample: the trend has two points
    second = capacity_report(CapacityRequest(thresholds=CapacityThresholds(disk_watch_pct=0.01)))
    assert all(r["status"] in ("watch", "act") for r in second["rows"])
    assert all(r["disk_growth_mb_per_day"] is not None for r in second["rows"])
    events = records().audit_events(action="capacity.usage")
    assert len(events) >= 2 and set(events[-1].details["hosts"]) == set(hosts)


def test_cost_report_prices_resources_per_cost_center(stack) -> None:
    prices = UnitPrices(
        cpu_core_month=10,
        memory_gb_month=0,
        disk_gb_month=0,
        host_month=1,
        cost_centers={"production": "cc-prod"},
    )
    result = cost_report(CostRequest(prices=prices, monthly_budget=1.0))
    cpus = {r["host"]: r["cpus"] for r in result["rows"]}
    prod = [h.name for h in stack.hosts if h.environment == "production"]
    expected = sum(cpus[h] * 10 + 1 for h in prod)
    assert result["totals"]["cc-prod"] == pytest.approx(expected)
    assert "staging" in result["totals"]
    assert result["over_budget"] is True


@pytest.fixture
def perf_service(monkeypatch, stack, tmp_path):
    """A sample-service instance on a free port of the first staging host, as service "perf"."""
    from kmpops.stack.sample_service import build_release, install_release

    host = next(h for h in stack.hosts if h.environment == "staging")
    port = free_port()
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["services"]["perf"] = {
        "deploy_path": "{root}/srv/perf",
        "restart": "{deploy_path}/current/control restart",
        "health_check": {"url": f"http://{{address}}:{port}/health"},
    }
    cfg = tmp_path / "ops.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(cfg))
    deploy = Path(host.root) / "srv" / "perf"
    control = deploy / "current" / "control"

    def start(version: str, **variant) -> None:
        if control.exists():
            subprocess.run([str(control), "stop"], check=True, timeout=30)
        install_release(build_release(version, tmp_path, **variant), deploy)
        subprocess.run([str(control), "start", "--port", str(port)], check=True, timeout=30)

    yield host, start
    subprocess.run([str(control), "stop"], check=False, timeout=30)


def test_performance_baseline_then_regression(stack, perf_service) -> None:
    host, start = perf_service
    start("1.0.0")
    req = PerformanceRequest(service="perf", host=host.name, requests=300, concurrency=4)
    first = performance_test(req)
    s = first["summary"]
    assert first["baseline"] is None and first["problems"] == []
    assert s["requests"] == 300 and s["error_rate"] == 0
    assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    assert s["throughput_rps"] > 0

    start("1.0.1-slow", variant="slow", parameter=0.03)
    slow = req.model_copy(update={"requests": 60, "regression": RegressionPolicy()})
    with pytest.raises(PolicyViolation, match="performance regression on perf@") as err:
        performance_test(slow)
    assert "p50" in str(err.value)

    from tasks.common import records

    tests = records().audit_events(action="performance.test", subject=f"perf@{host.name}")
    assert tests[-1].details["problems"]
    baselines = records().audit_events(action="performance.baseline", subject=f"perf@{host.name}")
    assert len(baselines) == 1  # the regression did not become the baseline


def test_performance_refuses_non_loopback(stack) -> None:
    with pytest.raises(UnsafeValueError):
        performance_test(PerformanceRequest(url="http://192.0.2.1:80/", requests=1))
