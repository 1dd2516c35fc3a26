"""ops.yaml validation: the guide's blocks load verbatim; every bad input names its field."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from kmpops.config import load_config, parse_config
from kmpops.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
# The guide's two YAML blocks, verbatim, kept in the repository: a clone has nothing beside it.
GUIDE = (REPO / "tests" / "fixtures" / "guide-blocks.md").read_text()


def guide_block(name: str) -> str:
    """The guide's own ```yaml block that starts with ``name:``, verbatim."""
    for chunk in GUIDE.split("```yaml")[1:]:
        block = chunk.split("```")[0]
        if block.lstrip().startswith(f"{name}:"):
            return block
    raise AssertionError(f"no {name}: block in the guide")


def test_guide_blocks_load_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "ops.yaml"
    path.write_text(guide_block("alerts") + guide_block("backups"))
    cfg = load_config(path)
    assert cfg.alerts["high_cpu"].threshold == pytest.approx(0.80)
    assert cfg.alerts["high_cpu"].duration == timedelta(minutes=5)
    assert cfg.alerts["error_rate"].severity == "critical"
    assert cfg.backups["database"].retention == timedelta(days=30)
    assert cfg.backups["configuration"].type == "incremental"
    assert cfg.backups["configuration"].schedule == "0 */6 * * *"


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "infra" / "local" / "ops.yaml")
    assert cfg.environments["production"].policy.approval_required
    assert cfg.services["web"].health_check.url


HOST = {"name": "a", "address": "127.0.0.1", "key_file": "/k", "known_hosts": "/kh"}


def test_an_error_rate_rule_names_its_own_metrics(tmp_path: Path) -> None:
    """kmp-ops assumes no service's metric names: on a config with hosts, the guide's
    ``error_rate`` needs a query (or a scrape measurement); ``high_cpu`` keeps its default."""
    alerts = yaml.safe_load(guide_block("alerts"))["alerts"]
    fleet = {"environments": {"production": {"hosts": [HOST]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(fleet | {"alerts": alerts})
    (problem,) = err.value.problems
    assert "alerts.error_rate.query: no query and no default" in problem, problem
    scrape = {"counter": {"metric": "http_requests_total", "match": {"code": "500"}}}
    scrape["per"] = {"metric": "http_requests_total"}
    alerts["error_rate"]["scrape"] = scrape
    cfg = parse_config(fleet | {"alerts": alerts})
    assert cfg.alerts["error_rate"].scrape.counter.match == {"code": "500"}
    assert cfg.alerts["high_cpu"].query is None  # evaluated with the default CPU query


def test_no_sample_service_metric_names_in_the_procedures() -> None:
    """The sample service's metric names live only in its own code and the stack's ops.yaml."""
    names = ("web_errors_total", "web_requests_total", "web_request_duration")
    found = []
    for top in ("kmpops", "tasks", "flows", "deployments"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path.parent.name == "stack" and path.parent.parent.name == "kmpops":
                continue  # the local stack runs the sample service and writes its ops.yaml
            text = path.read_text()
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n in text]
    assert found == []


BAD_CASES = [
    # (data, the field path and words that must appear in the one problem line)
    (
        {
            "environments": {
                "production": {
                    "hosts": [HOST, HOST | {"name": "b"}, HOST | {"name": "c", "port": 70000}]
                }
            }
        },
        "environments.production.hosts[2].port: ",
    ),
    (
        {"environments": {"production": {"hosts": [HOST | {"name": "web;rm -rf /"}]}}},
        "environments.production.hosts[0].name: 'web;rm -rf /' is not a safe name",
    ),
    (
        {"environments": {"production": {"hosts": [HOST | {"colour": "red"}]}}},
        "environments.production.hosts[0].colour: unknown key",
    ),
    (
        {"environments": {"production": {"hosts": [HOST, HOST]}}},
        "environments.production: Value error, duplicate host names: a".replace(
            "Value error, ", ""
        ),
    ),
    (
        {"alerts": {"cpu": {"threshold": "lots", "duration": "5m", "severity": "warning"}}},
        "alerts.cpu.threshold: ",
    ),
    (
        {"alerts": {"cpu": {"threshold": "80%", "duration": "5 minutes", "severity": "warning"}}},
        "alerts.cpu.duration: ",
    ),
    (
        {"alerts": {"cpu": {"threshold": "80%", "duration": "5m", "severity": "panic"}}},
        "alerts.cpu.severity: ",
    ),
    (
        {"backups": {"database": {"schedule": "daily", "retention": "30d", "type": "full"}}},
        "backups.database.schedule: 'daily' is not a five-field cron expression",
    ),
    (
        {
            "backups": {
                "database": {"schedule": "0 0 * * *", "retention": "30d", "type": "differential"}
            }
        },
        "backups.database.type: ",
    ),
    ({"storage": {"backend": "s3"}}, "storage: backend s3 needs a bucket"),
    (
        {"environments": {"production": {"policy": {"batch_size": "150%"}}}},
        "environments.production.policy.batch_size: '150%' is not a host count or a percentage",
    ),
    (
        {
            "environments": {
                "production": {
                    "policy": {"approval_required": True, "quorum": 2, "approvers": ["alice"]}
                }
            }
        },
        "environments.production.policy: quorum 2 needs at least 2 approvers",
    ),
    (
        {
            "services": {
                "web": {
                    "deploy_path": "/srv/../etc",
                    "restart": "x",
                    "health_check": {"url": "http://x"},
                }
            }
        },
        "services.web.deploy_path: '/srv/../etc' is not an acceptable path",
    ),
    (
        {"services": {"web": {"deploy_path": "/srv/web", "restart": "x", "health_check": {}}}},
        "services.web.health_check: give exactly one of url or command",
    ),
    ({"surprise": 1}, "surprise: unknown key"),
]


@pytest.mark.parametrize(
    ("data", "expected"), BAD_CASES, ids=[c[1].split(":")[0] for c in BAD_CASES]
)
def test_bad_config_names_the_field(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_at_once() -> None:
    data = {"alerts": {"a": {"threshold": "x", "duration": "y", "severity": "z"}}, "nope": 1}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert len(err.value.problems) == 4


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "ops.yaml"
    path.write_text("alerts:\n  a: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "malformed YAML at line" in err.value.problems[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_literal_secret_never_echoed() -> None:
    data = {
        "storage": {
            "backend": "s3",
            "bucket": "b",
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": "s3cr3t-value-123",
            "nonsense": True,
        }
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "s3cr3t-value-123" not in str(err.value)
    data["storage"].pop("nonsense")
    cfg = parse_config(data)
    assert "s3cr3t-value-123" not in repr(cfg)
    assert "s3cr3t-value-123" not in cfg.model_dump_json()


def test_secret_references() -> None:
    cfg = parse_config(
        {
            "storage": {
                "backend": "s3",
                "bucket": "b",
                "access_key_id": "env:AK",
                "secret_access_key": "file:/run/secrets/sk",
            }
        }
    )
    assert cfg.storage is not None
    assert str(cfg.storage.access_key_id) == "env:AK"
    assert cfg.storage.secret_access_key is not None
    assert cfg.storage.secret_access_key.scheme == "file"


def test_service_templates_render_per_host() -> None:
    cfg = parse_config(
        yaml.safe_load(
            textwrap.dedent("""
        environments:
          production:
            hosts:
              - {name: prd-1, address: 127.0.0.1, port: 2201, key_file: /k, known_hosts: /kh,
                 vars: {root: /srv/h1, web_port: 8001}}
        services:
          web:
            deploy_path: "{root}/srv/web"
            restart: "{deploy_path}/current/control restart --port {web_port}"
            health_check: {url: "http://{address}:{web_port}/health"}
    """)
        )
    )
    _, host = cfg.host("prd-1")
    web = cfg.service("web")
    assert web.deploy_path_for(host) == "/srv/h1/srv/web"
    assert web.render(web.health_check.url or "", host) == "http://127.0.0.1:8001/health"
    assert web.render(web.restart, host) == "/srv/h1/srv/web/current/control restart --port 8001"
