"""Capacity and cost: usage per host → headroom, trend, time to exhaustion, and cost.

Pure code, no I/O. :func:`linear_trend` fits a least-squares line through timestamped samples
(units per day); :func:`assess_host` compares a host's CPU, memory and disk use with
:class:`CapacityThresholds` and, with a disk history, forecasts the days until the disk is full;
:func:`cost_rows` prices the resources of each host with :class:`UnitPrices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CapacityThresholds",
    "HostCapacity",
    "HostUsage",
    "Sample",
    "UnitPrices",
    "assess_host",
    "cost_rows",
    "days_until_full",
    "linear_trend",
]

Status = Literal["ok", "watch", "act"]


@dataclass(frozen=True)
class Sample:
    """One observation of a quantity at a time (timezone-aware)."""

    ts: datetime
    value: float


@dataclass(frozen=True)
class HostUsage:
    """Resources of one host and how much is used (from /proc, df, Prometheus)."""

    host: str
    cpus: int
    cpu_used_pct: float
    mem_total_kb: int
    mem_used_kb: int
    disk_total_kb: int
    disk_used_kb: int

    @property
    def mem_used_pct(self) -> float:
        """Memory used, in percent."""
        return 100.0 * self.mem_used_kb / self.mem_total_kb if self.mem_total_kb else 0.0

    @property
    def disk_used_pct(self) -> float:
        """Disk used, in percent."""
        return 100.0 * self.disk_used_kb / self.disk_total_kb if self.disk_total_kb else 0.0


class CapacityThresholds(BaseModel):
    """Scaling thresholds: use above ``watch`` is noted, above ``act`` needs action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_watch_pct: float = Field(default=60.0, ge=0, le=100)
    cpu_act_pct: float = Field(default=80.0, ge=0, le=100)
    memory_watch_pct: float = Field(default=70.0, ge=0, le=100)
    memory_act_pct: float = Field(default=85.0, ge=0, le=100)
    disk_watch_pct: float = Field(default=70.0, ge=0, le=100)
    disk_act_pct: float = Field(default=85.0, ge=0, le=100)
    horizon_days: float = Field(default=30.0, gt=0, description="act if full sooner than this")


@dataclass(frozen=True)
class HostCapacity:
    """The assessment of one host."""

    host: str
    status: Status
    cpu_headroom_pct: float
    memory_headroom_pct: float
    disk_headroom_pct: float
    disk_growth_kb_per_day: float | None
    days_until_disk_full: float | None
    reasons: tuple[str, ...]


def linear_trend(samples: Sequence[Sample]) -> float | None:
    """Least-squares slope in units per day; None with fewer than two distinct times."""
    if len(samples) < 2:
        return None
    t0 = min(s.ts for s in samples)
    xs = [(s.ts - t0).total_seconds() / 86400 for s in samples]
    ys = [s.value for s in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def days_until_full(used: float, total: float, growth_per_day: float | None) -> float | None:
    """Days until ``used`` reaches ``total`` at ``growth_per_day``; None if not growing."""
    if growth_per_day is None or growth_per_day <= 0 or total <= 0:
        return None
    return max(0.0, (total - used) / growth_per_day)


def _level(value: float, watch: float, act: float) -> Status:
    return "act" if value >= act else ("watch" if value >= watch else "ok")


def assess_host(
    usage: HostUsage,
    thresholds: CapacityThresholds | None = None,
    disk_history: Sequence[Sample] = (),
) -> HostCapacity:
    """Headroom per resource, disk trend and forecast, and the worst status with reasons.

    ``disk_history`` holds earlier used-kb samples; the current value should be among them for
    the trend to include it.
    """
    t = thresholds or CapacityThresholds()
    reasons: list[str] = []
    levels: list[Status] = []
    for name, used, watch, act in (
        ("cpu", usage.cpu_used_pct, t.cpu_watch_pct, t.cpu_act_pct),
        ("memory", usage.mem_used_pct, t.memory_watch_pct, t.memory_act_pct),
        ("disk", usage.disk_used_pct, t.disk_watch_pct, t.disk_act_pct),
    ):
        level = _level(used, watch, act)
        levels.append(level)
        if level != "ok":
            limit = act if level == "act" else watch
            reasons.append(f"{name} {used:.0f}% used (≥ {limit:g}%)")
    growth = linear_trend(disk_history)
    days = days_until_full(usage.disk_used_kb, usage.disk_total_kb, growth)
    if days is not None and days < t.horizon_days:
        levels.append("act")
        reasons.append(f"disk full in {days:.1f} days at the current growth")
    order: dict[Status, int] = {"ok": 0, "watch": 1, "act": 2}
    status = max(levels, key=lambda s: order[s])
    return HostCapacity(
        host=usage.host,
        status=status,
        cpu_headroom_pct=round(100.0 - usage.cpu_used_pct, 1),
        memory_headroom_pct=round(100.0 - usage.mem_used_pct, 1),
        disk_headroom_pct=round(100.0 - usage.disk_used_pct, 1),
        disk_growth_kb_per_day=None if growth is None else round(growth, 1),
        days_until_disk_full=None if days is None else round(days, 1),
        reasons=tuple(reasons),
    )


class UnitPrices(BaseModel):
    """What a resource costs per month (the cost model is a parameter, not a secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "EUR"
    cpu_core_month: float = Field(default=20.0, ge=0)
    memory_gb_month: float = Field(default=3.0, ge=0)
    disk_gb_month: float = Field(default=0.1, ge=0)
    host_month: float = Field(default=0.0, ge=0, description="fixed cost per host")
    cost_centers: dict[str, str] = Field(
        default_factory=dict, description="environment → cost center"
    )


def cost_rows(
    usage: Sequence[tuple[str, HostUsage]], prices: UnitPrices
) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Monthly cost per host (allocated resources times unit price) and totals per cost center.

    ``usage`` pairs an environment name with each host's usage. Also reports the cost of the
    unused share of each resource (the optimisation opportunity).
    """
    rows: list[dict[str, object]] = []
    totals: dict[str, float] = {}
    for env, u in usage:
        mem_gb = u.mem_total_kb / 1024 / 1024
        disk_gb = u.disk_total_kb / 1024 / 1024
        cpu = u.cpus * prices.cpu_core_month
        mem = mem_gb * prices.memory_gb_month
        disk = disk_gb * prices.disk_gb_month
        total = cpu + mem + disk + prices.host_month
        idle = (
            cpu * (1 - u.cpu_used_pct / 100)
            + mem * (1 - u.mem_used_pct / 100)
            + disk * (1 - u.disk_used_pct / 100)
        )
        center = prices.cost_centers.get(env, env)
        totals[center] = round(totals.get(center, 0.0) + total, 2)
        rows.append(
            {
                "host": u.host,
                "environment": env,
                "cost_center": center,
                "cpus": u.cpus,
                "memory_gb": round(mem_gb, 2),
                "disk_gb": round(disk_gb, 2),
                f"monthly_{prices.currency}": round(total, 2),
                f"idle_{prices.currency}": round(idle, 2),
            }
        )
    return rows, totals


# -- performance ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear interpolation; NaN when empty."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class LoadResult:
    """What a load run measured: latencies of answered requests, errors, wall time."""

    latencies_s: tuple[float, ...]
    errors: int
    requests: int
    seconds: float

    def summary(self) -> dict[str, float]:
        """p50/p95/p99 in milliseconds, error rate (0..1) and throughput (requests/s)."""
        lat = sorted(self.latencies_s)
        return {
            "requests": float(self.requests),
            "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
            "p95_ms": round(percentile(lat, 0.95) * 1000, 3),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "throughput_rps": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
        }


class RegressionPolicy(BaseModel):
    """When a run is a regression against the baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_increase_pct: float = Field(default=50.0, ge=0)
    latency_min_delta_ms: float = Field(default=5.0, ge=0, description="ignore smaller changes")
    error_rate_max: float = Field(default=0.01, ge=0, le=1)
    throughput_drop_pct: float = Field(default=50.0, ge=0, le=100)


def compare_with_baseline(
    current: dict[str, float], baseline: dict[str, float] | None, policy: RegressionPolicy
) -> list[str]:
    """Regressions of ``current`` (a :meth:`LoadResult.summary`) against ``baseline``, in words.

    The error-rate limit applies with or without a baseline; latency and throughput only
    compare with a baseline.
    """
    problems = []
    if current["error_rate"] > policy.error_rate_max:
        problems.append(f"error rate {current['error_rate']:.2%} above {policy.error_rate_max:.2%}")
    if not baseline:
        return problems
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        was, now = baseline.get(key), current[key]
        if was is None:
            continue
        limit = was * (1 + policy.latency_increase_pct / 100)
        if now > limit and now - was > policy.latency_min_delta_ms:
            problems.append(f"{key[:3]} {now:.1f} ms vs baseline {was:.1f} ms")
    was_rps = baseline.get("throughput_rps")
    if was_rps and current["throughput_rps"] < was_rps * (1 - policy.throughput_drop_pct / 100):
        problems.append(f"throughput {current['throughput_rps']:.0f}/s vs baseline {was_rps:.0f}/s")
    return problems
