"""The pre-deployment checklist (kmpops.plans.checklist) as tables of facts: every gate reads
its evidence against its schema, bound to the artifact's sha256; a release marked bad is
refused unless an emergency override is asked for."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from kmpops.plans.checklist import (
    GATES,
    CommandCheck,
    EvidenceLimits,
    EvidenceUnreadable,
    HttpCheck,
    default_checklist,
    evaluate_checklist,
    marked_bad_marks,
    release_refusal,
)
from kmpops.stack import ci_evidence

SHA = "ab" * 32
KEY = "evidence/web/1.2.0/{}.json"


def valid_records() -> dict[str, Any]:
    return {KEY.format(g): r for g, r in ci_evidence("1.2.0", SHA).items()}


@dataclass
class Facts:
    service: str = "web"
    version: str = "1.2.0"
    artifact_sha256: str | None = SHA
    expected_sha256: str | None = SHA
    current_releases: dict = field(default_factory=lambda: {"h1": "1.1.0", "h2": "1.1.0"})
    records: dict = field(default_factory=valid_records)
    marked_bad: list = field(default_factory=list)
    emergency: bool = False
    commands: dict = field(default_factory=dict)
    urls: dict = field(default_factory=dict)

    def run_command(self, command):
        return self.commands.get(command, (127, "not found"))

    def http_status(self, url):
        return self.urls.get(url)

    def evidence_record(self, key):
        record = self.records.get(key)
        if isinstance(record, bytes):  # what the store holds when it is not JSON
            raise EvidenceUnreadable("not JSON (JSONDecodeError: Expecting value)")
        return copy.deepcopy(record)


def with_record(gate: str, change) -> Facts:
    """Facts whose ``gate`` record is changed by ``change(record)`` (or replaced by its value)."""
    facts = Facts()
    record = facts.records[KEY.format(gate)]
    out = change(record)
    facts.records[KEY.format(gate)] = record if out is None else out
    return facts


def drop(name):
    return lambda r: [r.pop(name)] and None


def put(name, value):
    return lambda r: r.__setitem__(name, value)


def findings(**counts):
    return lambda r: r["findings"].update(counts)


@pytest.mark.parametrize(
    ("facts", "failed", "reason"),
    [
        (Facts(), [], ""),
        # the findings of the issue: a report with 12 critical findings, a file that is not JSON
        (
            with_record("security_scan", findings(critical=12)),
            ["security_scan"],
            "12 critical finding(s) (at most 0 allowed) by demo-scan",
        ),
        (with_record("security_scan", lambda r: b'{"invalid": '), ["security_scan"], "not JSON"),
        (with_record("tests_passed", lambda r: b"<html>"), ["tests_passed"], "not JSON"),
        # every record is bound to this artifact
        (
            with_record("code_review", put("sha256", "ff" * 32)),
            ["code_review"],
            "evidence for another artifact (sha256 ffffffffffff",
        ),
        (with_record("tests_passed", drop("sha256")), ["tests_passed"], "missing field 'sha256'"),
        # code review: approved by someone other than the author
        (
            with_record("code_review", put("approved_by", ["dave"])),
            ["code_review"],
            "not approved by anyone other than the author 'dave'",
        ),
        (with_record("code_review", put("approved_by", [])), ["code_review"], "not approved"),
        (
            with_record("code_review", put("approved_by", "bob")),
            ["code_review"],
            "field 'approved_by' must be a list",
        ),
        (with_record("code_review", drop("author")), ["code_review"], "missing field 'author'"),
        # tests: failed = 0 and a minimum count, integers only
        (with_record("tests_passed", put("failed", 3)), ["tests_passed"], "3 test(s) failed"),
        (
            with_record("tests_passed", put("passed", 0)),
            ["tests_passed"],
            "only 0 test(s) ran (at least 1 required)",
        ),
        (
            with_record("tests_passed", put("failed", "0")),
            ["tests_passed"],
            "field 'failed' must be an integer or a list, not str",
        ),
        (with_record("tests_passed", put("failed", False)), ["tests_passed"], "not a boolean"),
        (with_record("tests_passed", drop("passed")), ["tests_passed"], "missing field 'passed'"),
        # security scan: findings by severity under the thresholds
        (with_record("security_scan", findings(high=1)), ["security_scan"], "1 high finding(s)"),
        (with_record("security_scan", findings(medium=40, low=300)), [], ""),
        (
            with_record("security_scan", lambda r: [r["findings"].pop("critical")] and None),
            ["security_scan"],
            "missing field 'critical'",
        ),
        (
            with_record("security_scan", put("findings", [])),
            ["security_scan"],
            "field 'findings' must be an object",
        ),
        # dependencies: nothing known-vulnerable, outdated within policy
        (
            with_record("dependencies_updated", put("vulnerable", ["urllib3 CVE-2099-1"])),
            ["dependencies_updated"],
            "1 known-vulnerable package(s)",
        ),
        (
            with_record("dependencies_updated", put("outdated", 9)),
            ["dependencies_updated"],
            "9 outdated package(s) (at most 0 allowed)",
        ),
        # documentation: a changelog entry for this version
        (
            with_record(
                "documentation_updated", put("changelog", {"version": "1.1.0", "entry": "x"})
            ),
            ["documentation_updated"],
            "changelog entry is for version '1.1.0', not '1.2.0'",
        ),
        (
            with_record(
                "documentation_updated", put("changelog", {"version": "1.2.0", "entry": " "})
            ),
            ["documentation_updated"],
            "changelog entry is empty",
        ),
        (
            with_record("documentation_updated", lambda r: ["not", "an", "object"]),
            ["documentation_updated"],
            "not a JSON object",
        ),
        # the artifact and the rollback plan, as before
        (
            Facts(artifact_sha256=None),
            [
                "code_review",
                "tests_passed",
                "security_scan",
                "dependencies_updated",
                "documentation_updated",
            ],
            "sha256 is not known",
        ),
        (Facts(expected_sha256="cd" * 32), ["security_scan"], "does not match"),
        (Facts(current_releases={"h1": "1.1.0", "h2": None}), ["rollback_plan"], "no previous"),
        # a release marked bad by an incident
        (
            Facts(marked_bad=["production/prd-1 by incident #7"]),
            ["release_not_marked_bad"],
            "web 1.2.0 was marked bad: production/prd-1 by incident #7 (refused",
        ),
        (
            Facts(marked_bad=["production/prd-1 by incident #7"], emergency=True),
            [],
            "EMERGENCY OVERRIDE (one more approver required)",
        ),
    ],
)
def test_gates_read_their_evidence(facts, failed, reason):
    limits = EvidenceLimits(min_tests=1, max_findings={"critical": 0, "high": 0}, max_outdated=0)
    report = evaluate_checklist(default_checklist(limits=limits), facts)
    assert report.failed == failed
    assert [row["gate"] for row in report.table()] == list(GATES)
    shown = " ".join(row["evidence"] for row in report.table())
    assert reason in shown  # the reason is in the checklist artifact's rows
    assert bool(report.overrides) is (facts.emergency and bool(facts.marked_bad))


def test_missing_record_and_first_install():
    facts = Facts()
    del facts.records[KEY.format("code_review")]
    report = evaluate_checklist(default_checklist(), facts)
    assert report.failed == ["code_review"]
    facts = Facts(current_releases={"h1": None, "h2": None})
    assert evaluate_checklist(default_checklist(allow_first_install=True), facts).passed


def test_limits_come_from_policy():
    facts = with_record("tests_passed", put("passed", 5))
    strict = EvidenceLimits(min_tests=100)
    assert evaluate_checklist(default_checklist(limits=strict), facts).failed == ["tests_passed"]


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


@pytest.mark.parametrize(
    ("events", "marks"),
    [
        ([], []),
        (
            [("web/production/prd-1", {"version": "1.2.0", "incident": 7})],
            ["production/prd-1 by incident #7"],
        ),
        ([("web/production/prd-1", {"version": "1.1.0"})], []),  # another version
        ([("webx/production/prd-1", {"version": "1.2.0"})], []),  # another service
        (
            [
                ("web/staging/stg-1", {"version": "1.2.0"}),
                ("web/production/prd-2", {"version": "1.2.0"}),
            ],
            ["staging/stg-1", "production/prd-2"],
        ),
    ],
)
def test_marked_bad_marks(events, marks):
    assert marked_bad_marks(events, service="web", version="1.2.0") == marks


@pytest.mark.parametrize(
    ("marks", "emergency", "refused"),
    [([], False, False), (["production/prd-1"], False, True), (["production/prd-1"], True, False)],
)
def test_release_refusal(marks, emergency, refused):
    why = release_refusal(marks, service="web", version="1.2.0", emergency=emergency)
    assert bool(why) is refused
    if refused:
        assert "web 1.2.0 was marked bad (production/prd-1)" in why
