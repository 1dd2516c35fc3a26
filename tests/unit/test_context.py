"""kmpops.context: a run's context built from a config object or a file, without Prefect.

The config is frozen for the run (a file edited afterwards is detected, never used), models are
resolved once, the object store is opened once, fences are the run's own, and closing the
context closes what it opened. Connections over a real sshd are in tests/flows/test_run_context.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kmpops.config import parse_config
from kmpops.context import ConfigSnapshot, RunContext, digest_of_config
from kmpops.errors import NotFound, PolicyViolation
from kmpops.locks import Fence
from kmpops.outcomes import HostOutcome, failures_of
from kmpops.plans.failures import group_failures


def config_data(root: Path) -> dict:
    host = {"address": "127.0.0.1", "key_file": str(root / "k"), "known_hosts": str(root / "kh")}
    return {
        "records": {"url": f"sqlite:///{root / 'records.db'}"},
        "storage": {"backend": "local", "path": str(root / "objects")},
        "environments": {
            "staging": {"hosts": [host | {"name": "stg-1"}]},
            "production": {"hosts": [host | {"name": "prd-1"}, host | {"name": "prd-2"}]},
        },
        "services": {
            "web": {
                "deploy_path": "/srv/web",
                "restart": "systemctl restart web",
                "health_check": {"command": "true"},
            }
        },
    }


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_context_from_a_config_object_resolves_once_and_names_what_is_unknown(
    tmp_path: Path,
) -> None:
    cfg = parse_config(config_data(tmp_path))
    with RunContext.from_config(cfg, run_id="r1", identity="alice") as ctx:
        assert ctx.config is cfg
        assert ctx.digest == digest_of_config(cfg)
        assert ctx.identity == "alice" and ctx.run_id == "r1"
        web = ctx.service("web")
        assert web.name == "web" and web.config is cfg.services["web"]
        assert [h.name for h in ctx.hosts("production")] == ["prd-1", "prd-2"]
        assert ctx.host("prd-2", "production") is cfg.environments["production"].hosts[1]
        assert ctx.environment_of("stg-1") == "staging"
        assert ctx.fleet.host_names == ["stg-1", "prd-1", "prd-2"]
        with pytest.raises(NotFound, match=r"unknown service 'api' \(known: web\)"):
            ctx.service("api")
        with pytest.raises(NotFound, match="known: production, staging"):
            ctx.hosts("qa")
        with pytest.raises(NotFound, match="'stg-1' is not in environment 'production'"):
            ctx.host("stg-1", "production")
        # a config object has no file to change under the run
        assert ctx.ensure_config_unchanged("deploy") == ctx.digest


def test_one_object_store_per_context_closed_with_it(tmp_path: Path) -> None:
    cfg = parse_config(config_data(tmp_path))
    ctx = RunContext.from_config(cfg)
    with ctx:
        store = ctx.store
        assert ctx.store is store  # not rebuilt per step
        store.put_bytes("releases/web/1.0.tar.gz", b"release")
        assert ctx.store.head("releases/web/1.0.tar.gz") is not None
    with RunContext.from_config(cfg) as other:
        assert other.store is not store  # another run, another store
    with pytest.raises(RuntimeError, match="closed"):
        ctx.__enter__()


def test_no_storage_is_a_clear_not_found(tmp_path: Path) -> None:
    data = config_data(tmp_path)
    del data["storage"]
    with (
        RunContext.from_config(parse_config(data)) as ctx,
        pytest.raises(NotFound, match="no storage configured"),
    ):
        ctx.store  # noqa: B018 - the property opens the store


def test_records_are_built_from_the_config_and_migrated(tmp_path: Path) -> None:
    with RunContext.from_config(parse_config(config_data(tmp_path))) as ctx:
        rec = ctx.records
        assert ctx.records is rec
        assert rec.current_release("web", "production", "prd-1") is None


def test_fences_are_the_runs_own(tmp_path: Path) -> None:
    cfg = parse_config(config_data(tmp_path))
    with RunContext.from_config(cfg) as a, RunContext.from_config(cfg) as b:
        fence = Fence("service:web@production", "run-a", 7)
        a.hold([fence])
        assert a.fence("service:web@production") == fence
        assert b.fence("service:web@production") is None
        assert dict(a.fences) == {"service:web@production": fence}
        a.drop(["service:web@production"])
        assert a.fence("service:web@production") is None


def test_a_config_file_edited_after_the_snapshot_is_refused(tmp_path: Path) -> None:
    data = config_data(tmp_path)
    path = write(tmp_path / "ops.yaml", data)
    snap = ConfigSnapshot.load(path)
    ctx = RunContext(snap)
    assert snap.change() is None
    # the same config written differently (key order) validates to the same digest: not a change
    write(path, dict(reversed(list(data.items()))))
    assert snap.change() is None
    data["services"]["web"]["restart"] = "systemctl restart web-new"
    write(path, data)
    with pytest.raises(
        PolicyViolation,
        match=r"deploy web: the config changed since the plan was approved \(config digest",
    ):
        ctx.ensure_config_unchanged("deploy web")
    assert ctx.config.services["web"].restart == "systemctl restart web"  # never reloaded
    path.write_text("services: [not, a, mapping]\n")
    with pytest.raises(PolicyViolation, match="the config no longer loads"):
        ctx.ensure_config_unchanged("deploy web")
    path.unlink()
    assert "no longer loads" in (snap.change() or "")


def test_host_outcomes_feed_the_grouped_failure_message() -> None:
    outcomes = {
        "prd-1": HostOutcome.succeeded("prd-1", "staged"),
        "prd-2": HostOutcome.failed("prd-2", TimeoutError("prd-2: no answer")),
        "prd-3": HostOutcome.failed("prd-3", TimeoutError("prd-3: no answer")),
    }
    assert outcomes["prd-1"].failure is None and outcomes["prd-1"].unwrap() == "staged"
    assert failures_of(outcomes) == {
        "prd-2": "TimeoutError: prd-2: no answer",
        "prd-3": "TimeoutError: prd-3: no answer",
    }
    assert group_failures(failures_of(outcomes)) == (
        "2 hosts: TimeoutError: no answer: prd-2, prd-3"
    )
    with pytest.raises(TimeoutError):
        outcomes["prd-2"].unwrap()
