"""Rollout plans as case tables: batch sizes, batching, stop rule."""

import pytest

from kmpops.plans.rollout import batch_count, plan_rollout, rollout_must_stop

HOSTS = [f"h{i}" for i in range(1, 11)]


@pytest.mark.parametrize(
    ("batch_size", "hosts", "expected"),
    [
        ("25%", 4, 1),
        ("25%", 10, 3),  # 2.5 rounds up
        ("50%", 4, 2),
        ("100%", 7, 7),
        ("1%", 3, 1),  # at least one host
        ("33.3333333333%", 3, 1),
        ("10%", 50, 5),
        (2, 10, 2),
        (20, 4, 4),  # capped at host count
        ("3", 10, 3),
    ],
)
def test_batch_count(batch_size, hosts, expected):
    assert batch_count(batch_size, hosts) == expected


@pytest.mark.parametrize("bad", [0, -1, "0%", "101%", "abc", "25", True, "", "%"])
def test_batch_count_refuses(bad):
    if bad == "25":
        assert batch_count(bad, 4) == 4
        return
    with pytest.raises(ValueError):
        batch_count(bad, 4)


@pytest.mark.parametrize(
    ("hosts", "batch_size", "batches"),
    [
        (HOSTS[:4], "25%", [["h1"], ["h2"], ["h3"], ["h4"]]),
        (HOSTS[:4], "50%", [["h1", "h2"], ["h3", "h4"]]),
        (HOSTS[:5], 2, [["h1", "h2"], ["h3", "h4"], ["h5"]]),
        (HOSTS[:3], "100%", [["h1", "h2", "h3"]]),
        (["only"], "25%", [["only"]]),
    ],
)
def test_plan_batches(hosts, batch_size, batches):
    plan = plan_rollout(
        hosts, service="web", version="1.0", environment="production", batch_size=batch_size
    )
    assert [list(b) for b in plan.batches] == batches
    assert list(plan.hosts) == hosts


def test_plan_refuses_empty_and_duplicates():
    with pytest.raises(ValueError, match="at least one host"):
        plan_rollout([], service="web", version="1", environment="p")
    with pytest.raises(ValueError, match="duplicate hosts in rollout: a"):
        plan_rollout(["a", "b", "a"], service="web", version="1", environment="p")
    with pytest.raises(ValueError, match="max_failures"):
        plan_rollout(["a"], service="web", version="1", environment="p", max_failures=-1)


def test_plan_markdown_names_hosts_and_previous():
    plan = plan_rollout(
        ["a", "b"],
        service="web",
        version="2.0",
        environment="production",
        batch_size=1,
        previous={"a": "1.0", "b": None},
    )
    text = plan.to_markdown()
    assert "`web` `2.0`" in text
    assert "| 1 | a | 1.0 |" in text
    assert "| 2 | b | (first install) |" in text


@pytest.mark.parametrize(
    ("failures", "max_failures", "stop"),
    [(0, 0, False), (1, 0, True), (1, 1, False), (2, 1, True), (3, 5, False)],
)
def test_rollout_must_stop(failures, max_failures, stop):
    assert rollout_must_stop(failures, max_failures) is stop


# --- the pre-deployment checklist (kmpops.plans.checklist): gates over tables of facts ---

from dataclasses import dataclass, field  # noqa: E402

from kmpops.plans.checklist import (  # noqa: E402
    GATES,
    CommandCheck,
    HttpCheck,
    default_checklist,
    evaluate_checklist,
)

SHA = "ab" * 32


@dataclass
class Facts:
    service: str = "web"
    version: str = "1.2.0"
    artifact_sha256: str | None = SHA
    expected_sha256: str | None = SHA
    current_releases: dict = field(default_factory=lambda: {"h1": "1.1.0", "h2": "1.1.0"})
    records: dict = field(
        default_factory=lambda: {f"evidence/web/1.2.0/{g}.json": {"by": "ci"} for g in GATES[:5]}
    )
    commands: dict = field(default_factory=dict)
    urls: dict = field(default_factory=dict)

    def run_command(self, command):
        return self.commands.get(command, (127, "not found"))

    def http_status(self, url):
        return self.urls.get(url)

    def evidence_record(self, key):
        return self.records.get(key)


def _without(key):
    f = Facts()
    del f.records[key]
    return f


@pytest.mark.parametrize(
    ("facts", "first_install", "failed"),
    [
        (Facts(), False, []),
        (_without("evidence/web/1.2.0/code_review.json"), False, ["code_review"]),
        (Facts(artifact_sha256=None), False, ["security_scan"]),
        (Facts(expected_sha256="cd" * 32), False, ["security_scan"]),
        (Facts(expected_sha256=None), False, ["security_scan"]),
        (Facts(current_releases={"h1": "1.1.0", "h2": None}), False, ["rollback_plan"]),
        (Facts(current_releases={"h1": None, "h2": None}), True, []),
        (
            Facts(
                records={f"evidence/web/1.2.0/{g}.json": {"sha256": "ff" * 32} for g in GATES[:5]}
            ),
            False,
            list(GATES[:5]),
        ),
    ],
)
def test_default_checklist(facts, first_install, failed):
    report = evaluate_checklist(default_checklist(allow_first_install=first_install), facts)
    assert report.failed == failed
    assert report.passed is (not failed)
    assert [row["gate"] for row in report.table()] == list(GATES)


def test_pluggable_checks_and_missing_gate():
    facts = Facts(commands={"make test": (0, "42 passed")}, urls={"http://ci/ok": 200})
    checks = default_checklist()
    checks["tests_passed"] = [CommandCheck("make test")]
    checks["code_review"] = [HttpCheck("http://ci/ok")]
    del checks["documentation_updated"]
    report = evaluate_checklist(checks, facts)
    assert report.failed == ["documentation_updated"]
    rows = {r["gate"]: r for r in report.table()}
    assert "42 passed" in rows["tests_passed"]["evidence"]
    assert "-> 200" in rows["code_review"]["evidence"]
