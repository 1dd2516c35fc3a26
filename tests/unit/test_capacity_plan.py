"""kmpops.plans.capacity as tables of cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kmpops.plans.capacity import (
    CapacityThresholds,
    HostUsage,
    LoadResult,
    RegressionPolicy,
    Sample,
    UnitPrices,
    assess_host,
    compare_with_baseline,
    cost_rows,
    days_until_full,
    linear_trend,
    percentile,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
GB = 1024 * 1024


def series(*values: float, step_days: float = 1.0) -> list[Sample]:
    return [Sample(T0 + timedelta(days=i * step_days), v) for i, v in enumerate(values)]


TRENDS = [
    ([], None),
    (series(5), None),
    (series(0, 10, 20), 10.0),
    (series(100, 100, 100), 0.0),
    (series(30, 20, 10), -10.0),
    (series(0, 7, step_days=7), 1.0),
    ([Sample(T0, 1), Sample(T0, 2)], None),
]


@pytest.mark.parametrize(("samples", "slope"), TRENDS)
def test_linear_trend(samples, slope) -> None:
    got = linear_trend(samples)
    assert got == slope if slope is None else got == pytest.approx(slope)


@pytest.mark.parametrize(
    ("used", "total", "growth", "days"),
    [
        (50, 100, 10, 5.0),
        (50, 100, 0, None),
        (50, 100, -1, None),
        (120, 100, 1, 0.0),
        (50, 100, None, None),
    ],
)
def test_days_until_full(used, total, growth, days) -> None:
    assert days_until_full(used, total, growth) == days


def usage(cpu: float = 10, mem: float = 0.3, disk: float = 0.3) -> HostUsage:
    return HostUsage("h", 4, cpu, 8 * GB, int(8 * GB * mem), 100 * GB, int(100 * GB * disk))


ASSESS = [
    ("idle", usage(), [], "ok", []),
    ("cpu watch", usage(cpu=65), [], "watch", ["cpu 65% used"]),
    ("cpu act", usage(cpu=90), [], "act", ["cpu 90% used"]),
    ("memory act", usage(mem=0.9), [], "act", ["memory 90% used"]),
    ("disk watch", usage(disk=0.75), [], "watch", ["disk 75% used"]),
    (
        "disk growing fast",
        usage(disk=0.5),
        series(30 * GB, 40 * GB, 50 * GB),
        "act",
        ["disk full in 5.0 days"],
    ),
    ("disk growing slowly", usage(disk=0.5), series(49 * GB, 49.5 * GB, 50 * GB), "ok", []),
]


@pytest.mark.parametrize(
    ("name", "u", "history", "status", "reasons"), ASSESS, ids=[a[0] for a in ASSESS]
)
def test_assess_host(name, u, history, status, reasons) -> None:
    got = assess_host(u, CapacityThresholds(), history)
    assert got.status == status
    assert len(got.reasons) == len(reasons)
    for want, have in zip(reasons, got.reasons, strict=True):
        assert have.startswith(want)
    assert got.cpu_headroom_pct == pytest.approx(100 - u.cpu_used_pct, abs=0.1)


def test_cost_rows_and_totals() -> None:
    prices = UnitPrices(
        cpu_core_month=10,
        memory_gb_month=2,
        disk_gb_month=0.5,
        host_month=5,
        cost_centers={"production": "cc-prod"},
    )
    a = HostUsage("a", 2, 50, 4 * GB, 2 * GB, 10 * GB, 5 * GB)
    rows, totals = cost_rows([("production", a), ("staging", a)], prices)
    # 2*10 + 4*2 + 10*0.5 + 5 = 38; idle = 20*.5 + 8*.5 + 5*.5 = 16.5
    assert rows[0]["monthly_EUR"] == 38.0 and rows[0]["idle_EUR"] == 16.5
    assert rows[0]["cost_center"] == "cc-prod" and rows[1]["cost_center"] == "staging"
    assert totals == {"cc-prod": 38.0, "staging": 38.0}


def test_percentile_and_summary() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile(values, 0.5) == pytest.approx(0.0505)
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN
    s = LoadResult(tuple(values), errors=2, requests=102, seconds=2.0).summary()
    assert s["p99_ms"] == pytest.approx(99.01, abs=0.01)
    assert s["error_rate"] == pytest.approx(2 / 102, abs=1e-4)
    assert s["throughput_rps"] == 51.0


BASE = {"p50_ms": 2.0, "p95_ms": 4.0, "p99_ms": 8.0, "error_rate": 0.0, "throughput_rps": 500}


def cur(**change: float) -> dict[str, float]:
    return {**BASE, **change}


REGRESSIONS = [
    ("same", cur(), BASE, []),
    ("no baseline", cur(p95_ms=400), None, []),
    ("errors without baseline", cur(error_rate=0.05), None, ["error"]),
    ("p95 doubled but tiny", cur(p95_ms=8.0), BASE, []),
    ("p95 slow", cur(p95_ms=60.0), BASE, ["p95"]),
    ("all slow", cur(p50_ms=50, p95_ms=60, p99_ms=70), BASE, ["p50", "p95", "p99"]),
    ("throughput halved", cur(throughput_rps=200), BASE, ["throughput"]),
]


@pytest.mark.parametrize(
    ("name", "current", "baseline", "expected"), REGRESSIONS, ids=[r[0] for r in REGRESSIONS]
)
def test_compare_with_baseline(name, current, baseline, expected) -> None:
    got = compare_with_baseline(current, baseline, RegressionPolicy())
    assert [g.split(" ")[0] for g in got] == expected
