"""Case tables for kmpops.plans.alerts: threshold/duration parsing and rule evaluation."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from kmpops.plans.alerts import (
    AlertRule,
    AlertState,
    evaluate,
    evaluate_series,
    labelset,
    parse_duration,
    parse_threshold,
    states_at,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80%", 0.8),
        ("1%", 0.01),
        ("0.5%", 0.005),
        ("100%", 1.0),
        (" 80 % ", 0.8),
        ("0.8", 0.8),
        ("250", 250.0),
        ("-3", -3.0),
        ("1e3", 1000.0),
        (80, 80.0),
        (0.25, 0.25),
    ],
)
def test_parse_threshold(text, expected):
    assert parse_threshold(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "%", "80 percent", "abc", "nan", "inf", "1e400", "8 0%", True, None, [1]]
)
def test_parse_threshold_rejects(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("5m", timedelta(minutes=5)),
        ("1m", timedelta(minutes=1)),
        ("30s", timedelta(seconds=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
        ("1y", timedelta(days=365)),
        ("1d12h30m15s500ms", timedelta(days=1, hours=12, minutes=30, seconds=15, milliseconds=500)),
        ("90m", timedelta(minutes=90)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "5", "5 m", "m", "1.5h", "30m1h", "5mm", "5x", "-5m", "1h1h", 5, None]
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


# --- rule evaluation -------------------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)
WEB1 = labelset(instance="web1")
WEB2 = labelset(instance="web2")


def rule(duration="5m", **kw):
    kw.setdefault("threshold", 0.8)
    return AlertRule(name="high_cpu", query="cpu", duration=parse_duration(duration), **kw)


def run(r, steps, *, every=timedelta(minutes=1)):
    """Evaluate ``steps`` (a list of {labelset: value}) once a minute; return states and
    transitions per step as compact tuples."""
    states, out = {}, []
    for i, samples in enumerate(steps):
        states, trans = evaluate(r, samples, states, T0 + i * every)
        out.append(
            (
                {dict(ls)["instance"]: st.state for ls, st in states.items()},
                [(dict(t.labels)["instance"], t.state) for t in trans],
            )
        )
    return out


def test_pending_then_firing_then_resolved():
    got = run(rule("2m"), [{WEB1: 0.9}, {WEB1: 0.95}, {WEB1: 0.9}, {WEB1: 0.5}, {}])
    assert got == [
        ({"web1": "pending"}, [("web1", "pending")]),
        ({"web1": "pending"}, []),
        ({"web1": "firing"}, [("web1", "firing")]),
        ({"web1": "resolved"}, [("web1", "resolved")]),
        ({"web1": "resolved"}, []),
    ]


def test_for_zero_fires_immediately():
    got = run(rule("0"), [{WEB1: 0.9}])
    assert got == [({"web1": "firing"}, [("web1", "pending"), ("web1", "firing")])]


def test_pending_dropped_silently_and_restarts_clock():
    got = run(rule("2m"), [{WEB1: 0.9}, {WEB1: 0.1}, {WEB1: 0.9}, {WEB1: 0.9}, {WEB1: 0.9}])
    assert [g[0] for g in got] == [
        {"web1": "pending"},
        {},
        {"web1": "pending"},
        {"web1": "pending"},
        {"web1": "firing"},
    ]
    assert got[1][1] == []


@pytest.mark.parametrize(
    ("comparison", "value", "passes"),
    [
        (">", 0.8, False),
        (">=", 0.8, True),
        ("<", 0.8, False),
        ("<=", 0.8, True),
        (">", 0.81, True),
        ("<", 0.79, True),
        (">", float("nan"), False),
        ("<", float("nan"), False),
        (">", None, False),
    ],
)
def test_comparison_filters_like_promql(comparison, value, passes):
    states, _ = evaluate(rule("0", comparison=comparison), {WEB1: value}, {}, T0)
    assert (WEB1 in states) is passes


def test_labelsets_are_independent():
    steps = [{WEB1: 0.9}, {WEB1: 0.9, WEB2: 0.9}, {WEB2: 0.9}, {WEB2: 0.9}]
    got = run(rule("1m"), steps)
    assert [g[0] for g in got] == [
        {"web1": "pending"},
        {"web1": "firing", "web2": "pending"},
        {"web1": "resolved", "web2": "firing"},
        {"web1": "resolved", "web2": "firing"},
    ]


def test_resolved_is_retained_15_minutes_then_dropped_and_can_refire():
    r = rule("0")
    states, _ = evaluate(r, {WEB1: 0.9}, {}, T0)
    states, trans = evaluate(r, {}, states, T0 + timedelta(minutes=1))
    assert states[WEB1].state == "resolved" and [t.state for t in trans] == ["resolved"]
    later, _ = evaluate(r, {}, states, T0 + timedelta(minutes=16))
    assert later[WEB1].state == "resolved"
    gone, _ = evaluate(r, {}, states, T0 + timedelta(minutes=16, seconds=1))
    assert gone == {}
    again, trans = evaluate(r, {WEB1: 0.9}, states, T0 + timedelta(minutes=2))
    assert again[WEB1].active_since == T0 + timedelta(minutes=2)
    assert [(t.previous, t.state) for t in trans] == [
        ("resolved", "pending"),
        ("pending", "firing"),
    ]


def test_keep_firing_for_holds_a_firing_alert():
    r = rule("0", keep_firing_for=timedelta(minutes=2))
    got = run(r, [{WEB1: 0.9}, {}, {}, {WEB1: 0.9}, {}, {}, {}])
    assert [g[0].get("web1") for g in got] == [
        "firing",
        "firing",
        "firing",
        "firing",
        "firing",
        "firing",
        "resolved",
    ]


def test_state_survives_a_restart_via_dict():
    r = rule("5m")
    states, _ = evaluate(r, {WEB1: 0.9}, {}, T0)
    stored = json.loads(json.dumps([v.to_dict() for v in states.values()]))
    restored = {}
    for record in stored:
        st = AlertState.from_dict(record)
        restored[st.labels] = st
    assert restored == states
    states, trans = evaluate(r, {WEB1: 0.9}, restored, T0 + timedelta(minutes=5))
    assert states[WEB1].state == "firing" and states[WEB1].active_since == T0
    assert [t.state for t in trans] == ["firing"]


def test_from_dict_rejects_bad_records():
    with pytest.raises(ValueError, match="state"):
        AlertState.from_dict({"rule": "x", "labels": {}, "state": "exploded"})
    with pytest.raises(ValueError, match="alert state"):
        AlertState.from_dict({"labels": {}})


def test_rule_from_guide_spec():
    r = AlertRule.from_spec(
        "high_cpu", {"threshold": "80%", "duration": "5m", "severity": "warning"}, query="cpu"
    )
    assert (r.threshold, r.duration, r.severity, r.comparison) == (
        0.8,
        timedelta(minutes=5),
        "warning",
        ">",
    )
    assert r.expr == "(cpu) > 0.8"
    with pytest.raises(ValueError, match=r"high_cpu.*duration"):
        AlertRule.from_spec("high_cpu", {"threshold": "80%", "duration": "5 min"}, query="q")
    with pytest.raises(ValueError, match=r"high_cpu.*threshold"):
        AlertRule.from_spec("high_cpu", {"duration": "5m"}, query="q")
    with pytest.raises(ValueError, match=r"high_cpu.*query"):
        AlertRule.from_spec("high_cpu", {"threshold": 1})
    with pytest.raises(ValueError, match="comparison"):
        rule(comparison="==")


# --- replay equals step-by-step evaluation ---------------------------------------------------


def step_by_step(r, series, start, end, interval, lookback=timedelta(minutes=5)):
    """Reference replay: evaluate() at every step, with a naive sample lookup."""
    changes, states = [], {}
    t = start
    while t <= end:
        samples = {}
        for ls, pts in series.items():
            usable = [v for ts, v in pts if v is not None and t - lookback <= ts <= t]
            if usable:
                samples[ls] = usable[-1]
        new, trans = evaluate(r, samples, states, t)
        changes += [(t, tr.labels, tr.state) for tr in trans]
        changes += [
            (t, ls, "inactive")
            for ls, st in states.items()
            if st.state == "pending" and ls not in new
        ]
        states, t = new, t + interval
    return changes


@pytest.mark.parametrize("seed", range(40))
def test_evaluate_series_matches_evaluate(seed):
    rnd = random.Random(seed)
    r = rule(
        rnd.choice(["0", "30s", "1m", "2m", "5m", "7m"]),
        comparison=rnd.choice([">", ">=", "<", "<="]),
        threshold=0.5,
        keep_firing_for=timedelta(minutes=rnd.choice([0, 0, 1, 3])),
    )
    series = {}
    for i in range(3):
        pts, t = [], T0 + timedelta(seconds=rnd.choice([0, 5, 15]))
        for _ in range(rnd.randint(0, 120)):
            roll = rnd.random()
            value = None if roll < 0.15 else rnd.choice([0.2, 0.5, 0.5, 0.9, 0.9, 0.9])
            pts.append((t, value))
            t += timedelta(seconds=rnd.choice([15, 15, 15, 60, 400]))
        series[labelset(instance=f"web{i}")] = pts
    end = T0 + timedelta(minutes=rnd.randint(5, 60))
    step = timedelta(seconds=rnd.choice([15, 30, 60]))
    expected = step_by_step(r, series, T0, end, step)
    got = evaluate_series(r, series, start=T0, end=end, interval=step)
    assert sorted(got, key=lambda c: (c[0], c[1])) == sorted(expected, key=lambda c: (c[0], c[1]))


def test_evaluate_series_epoch_seconds_and_states_at():
    series = {WEB1: [(float(t), 0.9 if 60 <= t < 300 else 0.1) for t in range(0, 600, 15)]}
    got = evaluate_series(rule("2m"), series, start=0.0, end=600.0, interval=timedelta(minutes=1))
    assert got == [(60.0, WEB1, "pending"), (180.0, WEB1, "firing"), (300.0, WEB1, "resolved")]
    at = states_at(got, [0.0, 120.0, 240.0, 360.0])
    assert at == {0.0: {}, 120.0: {WEB1: "pending"}, 240.0: {WEB1: "firing"}, 360.0: {}}


def test_evaluate_series_rejects_bad_window():
    with pytest.raises(ValueError, match="interval"):
        evaluate_series(rule(), {}, start=0.0, end=1.0, interval=timedelta(0))
    with pytest.raises(ValueError, match="end"):
        evaluate_series(rule(), {}, start=10.0, end=1.0, interval=timedelta(seconds=1))


def test_evaluate_series_int_threshold_and_int_times():
    r = AlertRule(name="errors", query="errors", threshold=5, duration=timedelta(0))
    series = {WEB1: [(0, 3), (60, 7), (120, 5)]}
    got = evaluate_series(r, series, start=0, end=180, interval=timedelta(minutes=1))
    assert got == [(60.0, WEB1, "pending"), (60.0, WEB1, "firing"), (120.0, WEB1, "resolved")]
