"""kmpops.plans.diagnosis: facts parsing and rules, as tables of cases."""

from __future__ import annotations

import subprocess
from dataclasses import replace

import pytest

from kmpops.plans.diagnosis import (
    FACTS_SCRIPT,
    DiskFact,
    Finding,
    HealthFact,
    HostFacts,
    ProcessFact,
    Thresholds,
    diagnose,
    parse_facts,
    recommend_level,
)

HEALTHY = HostFacts(
    host="h1",
    cpus=4,
    load=(0.5, 0.4, 0.3),
    mem_total_kb=8_000_000,
    mem_available_kb=4_000_000,
    swap_total_kb=1_000_000,
    swap_free_kb=1_000_000,
    disk=DiskFact("/dev/sda1", "/", 100_000_000, 40_000_000, 60_000_000),
    root_used_kb=10_000,
    processes=(ProcessFact(10, 3.0, 2.0, 100_000, "python3"),),
    listening_ports=frozenset({8080, 22}),
    service_port=8080,
    health=HealthFact("http://h1:8080/health", 200, 0.01),
    log_tail=("INFO started", "INFO ok"),
)

CASES = [
    ("healthy", {}, Thresholds(), []),
    ("load per cpu warning", {"load": (5.0, 1, 1)}, Thresholds(), [("high-cpu", "warning")]),
    ("load per cpu critical", {"load": (9.0, 1, 1)}, Thresholds(), [("high-cpu", "critical")]),
    ("low memory", {"mem_available_kb": 800_000}, Thresholds(), [("memory", "warning")]),
    ("no memory", {"mem_available_kb": 100_000}, Thresholds(), [("memory", "critical")]),
    ("swap used", {"swap_free_kb": 100_000}, Thresholds(), [("memory", "warning")]),
    (
        "process hog",
        {"processes": (ProcessFact(7, 1.0, 45.0, 3_600_000, "java"),)},
        Thresholds(),
        [("memory-leak", "warning")],
    ),
    (
        "disk 85%",
        {"disk": DiskFact("/dev/sda1", "/", 100, 85, 15)},
        Thresholds(),
        [("disk-space", "warning")],
    ),
    (
        "disk 95%",
        {"disk": DiskFact("/dev/sda1", "/", 100, 95, 5)},
        Thresholds(),
        [("disk-space", "critical")],
    ),
    (
        "root over budget",
        {"root_used_kb": 50 * 1024},
        Thresholds(root_budget_mb=30),
        [("disk-space", "critical")],
    ),
    ("root within budget", {"root_used_kb": 10 * 1024}, Thresholds(root_budget_mb=30), []),
    (
        "service down, not listening",
        {
            "health": HealthFact("u", None, error="connection refused"),
            "listening_ports": frozenset(),
        },
        Thresholds(),
        [("service-failure", "critical")],
    ),
    (
        "service crashed",
        {
            "health": HealthFact("u", None, error="connection refused"),
            "log_tail": ("Traceback (most recent call last):", "MemoryError"),
        },
        Thresholds(),
        [("crash", "critical"), ("errors", "warning")],
    ),
    (
        "health 503",
        {"health": HealthFact("u", 503, 0.01)},
        Thresholds(),
        [("service-failure", "critical")],
    ),
    (
        "health slow",
        {"health": HealthFact("u", 200, 2.5)},
        Thresholds(),
        [("performance", "warning")],
    ),
    (
        "health timeout",
        {"health": HealthFact("u", None, timed_out=True)},
        Thresholds(),
        [("timeout", "critical")],
    ),
    (
        "answers but port not seen",
        {"listening_ports": frozenset({22})},
        Thresholds(),
        [("network", "warning")],
    ),
    (
        "log errors",
        {"log_tail": ("ERROR db refused", "INFO x")},
        Thresholds(),
        [("errors", "warning")],
    ),
    (
        "log errors below threshold",
        {"log_tail": ("ERROR x",)},
        Thresholds(log_errors_warning=2),
        [],
    ),
    (
        "log timeouts",
        {"log_tail": ("upstream timed out after 5s",)},
        Thresholds(),
        [("timeout", "warning")],
    ),
    (
        "unreachable",
        {"reachable": False, "error": "refused"},
        Thresholds(),
        [("unreachable", "critical")],
    ),
]


@pytest.mark.parametrize(
    ("name", "change", "thresholds", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_diagnose_cases(name, change, thresholds, expected) -> None:
    findings = diagnose(replace(HEALTHY, **change), thresholds)
    assert sorted((f.issue, f.severity) for f in findings) == sorted(expected)
    for f in findings:
        assert f.next_steps, f"{name}: a finding without next steps"


def test_critical_first() -> None:
    facts = replace(HEALTHY, load=(5.0, 1, 1), disk=DiskFact("d", "/", 100, 95, 5))
    assert [f.severity for f in diagnose(facts)] == ["critical", "warning"]


def F(host: str, issue: str, severity: str) -> Finding:
    return Finding(host, issue, severity, "s")  # type: ignore[arg-type]


LEVELS = [
    ([], "none"),
    ([F("a", "errors", "warning")], "L1"),
    ([F("a", "disk-space", "critical"), F("a", "errors", "warning")], "L2"),
    ([F("a", "disk-space", "critical"), F("b", "service-failure", "critical")], "L3"),
    ([F("a", "crash", "critical")], "L3"),
]


@pytest.mark.parametrize(("findings", "level"), LEVELS)
def test_recommend_level(findings, level) -> None:
    assert recommend_level(findings) == level


def test_parse_facts_of_real_script_output(tmp_path) -> None:
    """The script runs under /bin/sh here and its output parses into sane facts."""
    (tmp_path / "big.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    log = tmp_path / "web.log"
    log.write_text("INFO a\nERROR boom\n")
    out = subprocess.run(
        ["sh", "-c", FACTS_SCRIPT, "kmpops-diag", str(tmp_path), str(log), "10"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    facts = parse_facts("local", out, service_port=1, log_path=str(log))
    assert facts.cpus >= 1
    assert facts.mem_total_kb > 0
    assert facts.disk is not None and facts.disk.size_kb > 0
    assert facts.root_used_kb is not None and facts.root_used_kb >= 2048
    assert facts.largest_files[0][0].endswith("big.bin")
    assert facts.processes
    assert facts.listening_ports is not None
    assert facts.log_tail == ("INFO a", "ERROR boom")


def test_parse_facts_tolerates_missing_sections() -> None:
    facts = parse_facts("x", "@@nproc\n2\n@@loadavg\n")
    assert facts.cpus == 2 and facts.load == (0.0, 0.0, 0.0) and facts.disk is None
