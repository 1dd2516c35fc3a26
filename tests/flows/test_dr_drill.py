"""dr-drill: restore the newest verified backups into scratch, record RTO and RPO, trend."""

from __future__ import annotations

import pytest

from tests.flows.backup_fixtures import (
    TABLES,
    drop_env,
    latest_artifact,
    make_env,
    seed_database,
)

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


@pytest.fixture
def bk(stack, tmp_path, monkeypatch):
    env = make_env(stack, tmp_path)
    seed_database(env)
    monkeypatch.setenv("KMPOPS_CONFIG", str(env.ops_yaml))
    yield env
    drop_env(env)


def test_dr_drill_records_rto_rpo_and_trend(bk):
    from flows.backup_configuration import backup_configuration
    from flows.backup_database import backup_database
    from flows.dr_drill import dr_drill
    from flows.verify_backups import verify_backups

    conf = bk.config_dirs["stg-1"]
    conf.mkdir(parents=True)
    (conf / "app.conf").write_text("listen = 8080\n")
    backup_database(["shop"])
    backup_configuration(hosts=["stg-1"])
    verify_backups(databases=["shop"], hosts=["stg-1"])

    first = dr_drill(databases=["shop"], hosts=["stg-1"])
    second = dr_drill(databases=["shop"], hosts=["stg-1"])
    for drill in (first, second):
        assert drill["passed"], drill["report"]
        assert 0 < drill["rto_s"] < drill["target_rto_s"]
        assert 0 < drill["rpo_s"] < drill["target_rpo_s"]
        assert {s["subject"] for s in drill["subjects"]} == {"database/shop", "configuration/stg-1"}
    assert second["rpo_s"] > first["rpo_s"]  # the same backups, older now

    drills = bk.records().drills()
    assert len(drills) == 2 and all(d.ok and d.rto_s and d.rpo_s for d in drills)
    assert drills[0].target_rto_s == 600 and drills[0].target_rpo_s == 9 * 3600
    report = second["report"]
    artifact = latest_artifact("dr-drill")
    assert artifact["type"] == "markdown" and "## Trend" in artifact["data"]
    assert "## Trend" in report and report.count("| pass |") == 2
    # the restore test behind the drill compared every table's row count
    shop = next(s for s in second["subjects"] if s["subject"] == "database/shop")
    assert f"{len(TABLES)} tables, {sum(TABLES.values())} rows match" in shop["detail"]


def test_dr_drill_without_verified_backup_fails_and_notifies(bk):
    from flows.dr_drill import dr_drill
    from kmpops.connectors.notify import read_sink

    drill = dr_drill(databases=["shop"], hosts=[])
    assert not drill["passed"] and drill["rto_s"] is None and drill["rpo_s"] is None
    assert "no verified backup" in drill["report"]
    assert any(n["title"] == "DR drill missed its targets" for n in read_sink(bk.notifications))
    [recorded] = bk.records().drills()
    assert not recorded.ok
