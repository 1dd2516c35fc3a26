"""Conformance of kmp-ops' alert decisions with Prometheus, checked by ``promtool test rules``.

Each generated case (steady, flapping, gaps, exact-threshold values, ``for: 0``, ``for:``
longer than the series, ``keep_firing_for``, several labelsets, random walks) is replayed with
:func:`kmpops.plans.alerts.evaluate_series`; the decisions are written as promtool unit tests
and promtool, running Prometheus' own rule engine on the same input series, must agree:

- ``alert_rule_test`` at every evaluation: ``exp_alerts`` lists exactly the *firing* alerts
  (promtool only ever reports firing alerts there);
- ``promql_expr_test`` on ``ALERTS{alertname=...}`` at every evaluation: the series promtool's
  rule group writes for pending and firing alerts (``alertstate`` label), so pending decisions
  are checked too.

The generated files are written to ``tests/unit/alert_cases/generated/`` (git-ignored content,
useful when a case fails: rerun ``promtool test rules`` on them by hand).
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from kmpops.plans.alerts import AlertRule, evaluate_series, labelset, states_at

PROMTOOL = Path("/usr/bin/promtool")
SAMPLE_STEP = 15.0  # seconds between input samples (promtool's ``interval``)
pytestmark = pytest.mark.skipif(not PROMTOOL.exists(), reason="promtool is not installed")


@dataclass(frozen=True)
class Case:
    name: str
    series: dict[str, list[float | None]]  # instance -> values at 0, 15 s, 30 s, ...
    threshold: float = 80.0
    comparison: str = ">"
    hold: str = "2m"
    keep_firing_for: str = "0"
    eval_interval: int = 60  # seconds
    extra_evals: int = 10  # evaluations past the end of the series


def _fmt(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def encode_values(values: list[float | None]) -> str:
    """promtool's expanding notation: ``v+0xN`` is N+1 equal values, ``_xN`` is N gaps."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        run = j - i + 1
        if values[i] is None:
            out.append("_" if run == 1 else f"_x{run}")
        else:
            v = _fmt(values[i])
            out.append(v if run == 1 else f"{v}+0x{run - 1}")
        i = j + 1
    return " ".join(out)


def _seconds(sec: float) -> str:
    return f"{round(sec * 1000)}ms"


def generate_cases() -> list[Case]:
    """The conformance set: hand-shaped edge cases plus seeded random walks."""
    up, down = 90.0, 50.0
    cases = [
        Case("steady_above", {"a": [up] * 60}),
        Case("steady_below", {"a": [down] * 60}),
        Case("for_zero", {"a": [down] * 8 + [up] * 8 + [down] * 8}, hold="0"),
        Case("for_zero_single_sample", {"a": [down] * 8 + [up] + [down] * 8}, hold="0"),
        Case("for_longer_than_series", {"a": [up] * 30}, hold="30m"),
        Case("for_exactly_series", {"a": [up] * 41}, hold="10m"),
        Case("flap_every_sample", {"a": [up, down] * 40}),
        Case("flap_every_2_samples", {"a": [up, up, down, down] * 20}, hold="1m"),
        Case("flap_every_minute", {"a": ([up] * 4 + [down] * 4) * 10}, hold="1m"),
        Case("flap_slow", {"a": ([up] * 12 + [down] * 8) * 4}, hold="2m"),
        Case("exact_gt", {"a": [80.0] * 40}, comparison=">"),
        Case("exact_ge", {"a": [80.0] * 40}, comparison=">="),
        Case("exact_lt", {"a": [80.0] * 40}, comparison="<"),
        Case("exact_le", {"a": [80.0] * 40}, comparison="<="),
        Case("exact_then_above", {"a": [80.0] * 10 + [80.5] * 20 + [80.0] * 10}),
        Case("below_rule", {"a": [up] * 10 + [down] * 30 + [up] * 10}, comparison="<"),
        Case("ratio_threshold", {"a": [0.5] * 8 + [0.81] * 30 + [0.8] * 10}, threshold=0.8),
        Case("gap_within_lookback", {"a": [up] * 12 + [None] * 16 + [up] * 20}),
        Case("gap_beyond_lookback", {"a": [up] * 20 + [None] * 24 + [up] * 20}),
        Case("gap_exactly_lookback", {"a": [up] * 13 + [None] * 20 + [up] * 12}, hold="0"),
        Case("last_sample_exactly_lookback", {"a": [down] * 4 + [up] * 9}, hold="0"),
        Case("gap_then_below", {"a": [up] * 16 + [None] * 8 + [down] * 12}),
        Case("series_starts_late", {"a": [None] * 30 + [up] * 30}),
        Case("series_ends_early", {"a": [up] * 16}, extra_evals=15),
        Case("keep_firing", {"a": [up] * 16 + [down] * 20 + [up] * 4}, keep_firing_for="3m"),
        Case(
            "keep_firing_flap",
            {"a": ([up] * 10 + [down] * 6) * 4},
            hold="1m",
            keep_firing_for="2m",
        ),
        Case(
            "two_instances",
            {"a": [up] * 40, "b": [down] * 10 + [up] * 20 + [down] * 10},
        ),
        Case(
            "three_instances_mixed",
            {"a": [up, down] * 20, "b": [None] * 10 + [up] * 30, "c": [80.0] * 40},
            comparison=">=",
            hold="1m",
        ),
        Case("eval_30s", {"a": ([up] * 5 + [down] * 3) * 8}, hold="1m", eval_interval=30),
        Case("eval_15s_for_zero", {"a": [up, down, down] * 20}, hold="0", eval_interval=15),
        Case("eval_2m", {"a": ([up] * 10 + [down] * 6) * 5}, hold="4m", eval_interval=120),
        Case("odd_hold", {"a": [up] * 50}, hold="1m30s", eval_interval=30),
    ]
    rnd = random.Random(20240601)
    for n in range(14):
        series = {}
        for inst in "abc"[: rnd.randint(1, 3)]:
            value, values = rnd.uniform(60, 100), []
            for _ in range(rnd.randint(20, 90)):
                value = min(100.0, max(0.0, value + rnd.uniform(-8, 8)))
                roll = rnd.random()
                values.append(None if roll < 0.1 else (80.0 if roll < 0.15 else round(value, 1)))
            series[inst] = values
        cases.append(
            Case(
                f"random_{n}",
                series,
                comparison=rnd.choice([">", ">=", "<", "<="]),
                hold=rnd.choice(["0", "30s", "1m", "2m", "5m"]),
                keep_firing_for=rnd.choice(["0", "0", "0", "1m", "2m"]),
                eval_interval=rnd.choice([30, 60]),
            )
        )
    return cases


def rule_for(case: Case) -> AlertRule:
    return AlertRule.from_spec(
        case.name,
        {
            "threshold": case.threshold,
            "comparison": case.comparison,
            "duration": case.hold,
            "severity": "warning",
            "keep_firing_for": case.keep_firing_for,
        },
        query=f"{case.name}_metric",
    )


def expected_states(case: Case) -> dict[float, dict[tuple, str]]:
    """kmp-ops' decisions: active states at every evaluation time of the case."""
    rule = rule_for(case)
    series = {
        labelset(instance=inst): [(i * SAMPLE_STEP, v) for i, v in enumerate(values)]
        for inst, values in case.series.items()
    }
    length = max(len(v) for v in case.series.values()) * SAMPLE_STEP
    end = (length // case.eval_interval + case.extra_evals) * case.eval_interval
    changes = evaluate_series(
        rule, series, start=0.0, end=end, interval=timedelta(seconds=case.eval_interval)
    )
    times = [float(k * case.eval_interval) for k in range(int(end // case.eval_interval) + 1)]
    return states_at(changes, times)


def promtool_files(case: Case, states: dict[float, dict[tuple, str]]) -> tuple[dict, dict]:
    """The rule file and the unit-test file (as YAML-ready dicts) for one case."""
    rule = rule_for(case)
    metric = rule.query
    spec = {"alert": case.name, "expr": f"{metric} {rule.comparison} {_fmt(rule.threshold)}"}
    spec["for"] = case.hold
    if case.keep_firing_for != "0":
        spec["keep_firing_for"] = case.keep_firing_for
    spec["labels"] = {"severity": rule.severity}
    rules = {"groups": [{"name": case.name, "rules": [spec]}]}

    alert_tests, expr_tests = [], []
    for when, active in states.items():
        firing = sorted(dict(ls)["instance"] for ls, st in active.items() if st == "firing")
        alert_tests.append(
            {
                "eval_time": _seconds(when),
                "alertname": case.name,
                "exp_alerts": [
                    {"exp_labels": {"instance": inst, "severity": "warning"}} for inst in firing
                ],
            }
        )
        expr_tests.append(
            {
                "expr": f'ALERTS{{alertname="{case.name}"}}',
                "eval_time": _seconds(when),
                "exp_samples": [
                    {
                        "labels": (
                            f'ALERTS{{alertname="{case.name}",alertstate="{st}",'
                            f'instance="{dict(ls)["instance"]}",severity="warning"}}'
                        ),
                        "value": 1,
                    }
                    for ls, st in sorted(active.items())
                ],
            }
        )
    test = {
        "rule_files": [f"{case.name}.rules.yml"],
        "evaluation_interval": f"{case.eval_interval}s",
        "tests": [
            {
                "interval": f"{int(SAMPLE_STEP)}s",
                "input_series": [
                    {"series": f'{metric}{{instance="{inst}"}}', "values": encode_values(values)}
                    for inst, values in case.series.items()
                ],
                "alert_rule_test": alert_tests,
                "promql_expr_test": expr_tests,
            }
        ],
    }
    return rules, test


def write_case(case: Case, directory: Path) -> Path:
    rules, test = promtool_files(case, expected_states(case))
    (directory / f"{case.name}.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    test_path = directory / f"{case.name}.test.yml"
    test_path.write_text(yaml.safe_dump(test, sort_keys=False))
    return test_path


CASES = generate_cases()


def test_encode_values():
    assert encode_values([1.0, 1.0, 1.0, None, None, 2.5, None, 80.0]) == "1+0x2 _x2 2.5 _ 80"


def test_case_set_is_broad():
    assert len(CASES) >= 30
    decided = [expected_states(c) for c in CASES]
    kinds = {st for states in decided for active in states.values() for st in active.values()}
    assert kinds == {"pending", "firing"}
    # some cases never alert, some flap (fire, resolve and fire again)
    assert any(not any(a for a in s.values()) for s in decided)

    def fired_again(states):
        episodes, before = 0, False
        for active in states.values():
            now = "firing" in active.values()
            episodes += now and not before
            before = now
        return episodes >= 2

    assert sum(fired_again(s) for s in decided) >= 5


def test_promtool_agrees_with_kmpops_decisions():
    directory = Path(__file__).parent / "alert_cases" / "generated"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    paths = [write_case(case, directory) for case in CASES]
    proc = subprocess.run(
        [str(PROMTOOL), "test", "rules", *[p.name for p in paths]],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert not failed
    assert proc.stdout.count("SUCCESS") == len(CASES)
