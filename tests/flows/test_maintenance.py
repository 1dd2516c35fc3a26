"""maintenance-daily/-weekly/-monthly on the real stack."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from flows.maintenance import (
    DailyOptions,
    WeeklyOptions,
    maintenance_daily,
    maintenance_monthly,
    maintenance_weekly,
    releases_to_prune,
)
from tests.conftest import give_to_deploy_user
from tests.flows.ops_variant import ops_yaml_variant

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


@pytest.fixture
def variant(monkeypatch, stack, tmp_path):
    return ops_yaml_variant(stack, tmp_path, monkeypatch)


def parts_of(result: dict) -> dict[str, dict]:
    return {p["part"]: p for p in result["parts"]}


@pytest.mark.parametrize(
    ("releases", "keep", "protect", "doomed"),
    [
        (["r5", "r4", "r3", "r2", "r1"], 2, {"r5"}, ["r3", "r2", "r1"]),
        (["r5", "r4", "r3", "r2", "r1"], 2, {"r5", "r2"}, ["r3", "r1"]),
        (["r2", "r1"], 2, {None}, []),
        (["r4", "r3", "r2", "r1"], 3, {"r1"}, []),
    ],
)
def test_releases_to_prune(releases, keep, protect, doomed) -> None:
    assert releases_to_prune(releases, keep, protect) == doomed


def test_weekly_reports_then_prunes_old_releases_and_records_disk_usage(stack, variant) -> None:
    def mutate(data: dict) -> None:
        data["services"]["probe"] = {
            "deploy_path": "{root}/srv/probe",
            "keep_releases": 2,
            "restart": "/bin/true",
            "health_check": {"command": "true"},
        }

    variant(mutate)
    host = next(h for h in stack.hosts if h.environment == "staging")
    deploy = Path(host.root) / "srv" / "probe"
    names = ["1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"]
    now = time.time()
    for i, name in enumerate(names):
        d = deploy / "releases" / name
        d.mkdir(parents=True, exist_ok=True)
        os.utime(d, (now - 1000 + i * 100, now - 1000 + i * 100))
    (deploy / "current").symlink_to("releases/1.0.5")
    give_to_deploy_user(stack, deploy)  # the deploy user prunes what it owns
    opts = WeeklyOptions(environment="staging", services=["probe"])
    dry = maintenance_weekly(opts)
    pruning = {r["host"]: r for r in parts_of(dry)["release pruning"]["pruning"]}
    assert pruning[host.name]["prune"] == ["1.0.3", "1.0.2", "1.0.1"]
    assert pruning[host.name]["removed"] == []
    assert sorted(p.name for p in (deploy / "releases").iterdir()) == names
    assert "dry run: would remove 3" in parts_of(dry)["release pruning"]["detail"]

    applied = maintenance_weekly(opts.model_copy(update={"apply_pruning": True}))
    pruning = {r["host"]: r for r in parts_of(applied)["release pruning"]["pruning"]}
    assert pruning[host.name]["removed"] == ["1.0.3", "1.0.2", "1.0.1"]
    assert sorted(p.name for p in (deploy / "releases").iterdir()) == ["1.0.4", "1.0.5"]

    trend = {r["host"]: r for r in parts_of(applied)["disk usage trend"]["trend"]}
    assert trend[host.name]["samples"] >= 2
    assert trend[host.name]["used_mb"] > 0

    from tasks.common import records

    events = records().audit_events(action="maintenance.disk_usage")
    assert host.name in events[-1].details["hosts"]


def test_daily_flags_log_volume_and_runs_every_part(stack) -> None:
    host = stack.hosts[0]
    log_dir = Path(host.root) / "srv" / "web" / "shared" / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    big = log_dir / "maintenance-test.log"
    big.write_bytes(b"x" * (3 * 1024 * 1024))
    give_to_deploy_user(stack, Path(host.root) / "srv" / "web")
    try:
        result = maintenance_daily(DailyOptions(log_volume_warning_mb=2))
    finally:
        big.unlink()
    parts = parts_of(result)
    assert set(parts) == {
        "host health",
        "log volume",
        "backup status",
        "backup verification",
        "alert review",
    }
    assert parts["log volume"]["status"] == "failed"
    assert f"{host.name}/web" in parts["log volume"]["detail"]
    # host health: every configured host looked at; failed exactly when a finding is critical
    detail = parts["host health"]["detail"]
    found = re.fullmatch(r"(\d+) hosts, (\d+) findings \((\d+) critical\), level \S+", detail)
    assert found, detail
    assert int(found[1]) == len(stack.hosts)
    assert parts["host health"]["status"] == ("failed" if int(found[3]) else "ok")
    assert any(r["name"] == "app" for r in parts["backup status"]["backups"])


def test_monthly_runs_compliance_and_reports_missing_parts(stack) -> None:
    result = maintenance_monthly(["compliance", "capacity"])
    parts = parts_of(result)
    assert "checks" in parts["compliance audit"]["detail"]
    assert parts["capacity report"]["status"] == "ok", parts["capacity report"]
    with pytest.raises(ValueError, match="unknown parts"):
        maintenance_monthly(["coffee"])
