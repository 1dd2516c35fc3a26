"""kmpops.plans.analysis as tables of cases: readings, measurements, analyses, policy, queries."""

from __future__ import annotations

import math

import pytest

from kmpops.plans.analysis import (
    Outcome,
    Reading,
    ReadingResult,
    instances_regex,
    judge_analysis,
    judge_measurement,
    judge_reading,
    meets,
    reading_interval,
    render_query,
    should_stop,
    verification_action,
    window_text,
)

P, F, U = Outcome.PASSED, Outcome.FAILED, Outcome.INCONCLUSIVE


@pytest.mark.parametrize(
    ("value", "condition", "expected"),
    [
        (0.01, "< 0.05", True),
        (0.05, "< 0.05", False),
        (0.05, "<= 0.05", True),
        (0.0, "<= 0", True),
        (1.0, "<= 0", False),
        (0.999, ">= 0.99", True),
        (0.98, ">= 0.99", False),
        (3.0, "> 2", True),
        (0.0, "== 0", True),
        (1e-3, "< 1e-2", True),
    ],
)
def test_meets(value, condition, expected):
    assert meets(value, condition) is expected


@pytest.mark.parametrize("condition", ["", "lt 0.05", "< x", "0.05", "<< 1", "< 1 and > 0"])
def test_bad_condition_is_refused(condition):
    with pytest.raises(ValueError, match="is not a condition"):
        meets(0.0, condition)


@pytest.mark.parametrize(
    ("reading", "success", "min_requests", "outcome", "reason"),
    [
        # the finding: 0 errors in 0 requests was a pass; it is inconclusive now
        (Reading(None, 0.0, "no data"), "< 0.05", 20, U, "too little traffic (0 requests"),
        (Reading(None, None, "no data"), "< 0.05", 20, U, "inconclusive: no data"),
        (Reading(0.0, 0.0), "< 0.05", 20, U, "too little traffic (0 requests, at least 20"),
        (Reading(0.0, 19.0), "< 0.05", 20, U, "too little traffic (19 requests"),
        (Reading(math.nan, 100.0), "< 0.05", 20, U, "inconclusive"),
        (Reading(0.0, 20.0), "< 0.05", 20, P, "0 meets < 0.05"),
        (Reading(0.33, 120.0), "< 0.05", 20, F, "0.33 does not meet < 0.05"),
        # too little traffic is checked before the value: 1 error in 3 requests says nothing
        (Reading(0.33, 3.0), "< 0.05", 20, U, "too little traffic"),
        # no request count (a log measurement): judged by value alone
        (Reading(0.0, None), "<= 0", 0, P, "0 meets <= 0"),
        (Reading(4.0, None), "<= 0", 0, F, "4 does not meet <= 0"),
        (Reading(None, None, "log /x is missing"), "<= 0", 0, U, "log /x is missing"),
    ],
)
def test_judge_reading(reading, success, min_requests, outcome, reason):
    result = judge_reading(reading, success=success, min_requests=min_requests)
    assert result.outcome is outcome
    assert reason in result.reason


def _r(outcome: Outcome) -> ReadingResult:
    return ReadingResult(outcome, f"{outcome.value} reading", Reading(0.0))


@pytest.mark.parametrize(
    ("readings", "count", "failure_limit", "outcome"),
    [
        ([P, P, P], 3, 0, P),
        ([P, F, P], 3, 0, F),
        ([P, F, P], 3, 1, P),
        ([F, F], 3, 1, F),
        ([P, U, P], 3, 0, U),
        ([U, F], 3, 0, F),  # a failure beats an inconclusive reading
        ([U, F], 3, 1, U),
        ([P, P], 3, 0, U),  # fewer readings than asked: not verified
        ([], 3, 0, U),
    ],
)
def test_judge_measurement(readings, count, failure_limit, outcome):
    verdict = judge_measurement(
        "error-ratio", [_r(o) for o in readings], count=count, failure_limit=failure_limit
    )
    assert verdict.outcome is outcome
    assert verdict.reason.startswith("error-ratio: ")


@pytest.mark.parametrize(
    ("readings", "failure_limit", "stop"),
    [([], 0, False), ([P, P], 0, False), ([F], 0, True), ([F], 1, False), ([F, U, F], 1, True)],
)
def test_should_stop(readings, failure_limit, stop):
    assert should_stop([_r(o) for o in readings], failure_limit=failure_limit) is stop


@pytest.mark.parametrize(
    ("outcomes", "overall"),
    [([P, P], P), ([P, U], U), ([U, F], F), ([F, P], F), ([], Outcome.NOT_CONFIGURED)],
)
def test_judge_analysis_worst_wins(outcomes, overall):
    verdicts = [
        judge_measurement(f"m{i}", [_r(o)], count=1, failure_limit=0)
        for i, o in enumerate(outcomes)
    ]
    report = judge_analysis("web on staging", verdicts)
    assert report.outcome is overall
    assert report.describe().startswith("analysis of web on staging")
    assert len(report.rows()) == len(outcomes)


@pytest.mark.parametrize(
    ("outcome", "policy", "action"),
    [
        (P, "fail", "proceed"),
        (P, "pause", "proceed"),
        (F, "fail", "roll_back"),
        (F, "pause", "roll_back"),  # a failed analysis is never put to a vote
        (U, "fail", "roll_back"),
        (U, "pause", "pause"),
        (Outcome.NOT_CONFIGURED, "fail", "proceed"),
    ],
)
def test_verification_action(outcome, policy, action):
    assert verification_action(outcome, policy) == action


@pytest.mark.parametrize(
    ("instances", "regex"),
    [
        (["127.0.0.1:16501"], "127\\\\.0\\\\.0\\\\.1:16501"),
        (["b:2", "a:1", "a:1"], "a:1|b:2"),
        ([], "(?!)"),  # no hosts: matches nothing, never every instance
    ],
)
def test_instances_regex(instances, regex):
    assert instances_regex(instances) == regex


def test_render_query_leaves_promql_braces_alone():
    query = 'sum(increase(x{job="web",instance=~"{instances}"}[{window}]))'
    out = render_query(query, {"instances": "a:1", "window": "7s"})
    assert out == 'sum(increase(x{job="web",instance=~"a:1"}[7s]))'
    with pytest.raises(ValueError, match="unknown placeholder"):
        render_query("x[{nope}]", {"window": "1s"})


@pytest.mark.parametrize(("seconds", "text"), [(0, "1s"), (0.2, "1s"), (1.0, "1s"), (7.01, "8s")])
def test_window_text(seconds, text):
    assert window_text(seconds) == text


@pytest.mark.parametrize(
    ("configured", "count", "bake", "interval"),
    [(1.0, 2, None, 1.0), (1.0, 2, 0.0, 1.0), (1.0, 2, 5.0, 2.5), (3.0, 3, 1.5, 0.5)],
)
def test_reading_interval(configured, count, bake, interval):
    assert reading_interval(configured, count, bake) == interval
