"""kmpops.plans.incident as case tables: containment plans, notifications, postmortem numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kmpops.plans.alerts import AlertState, evaluate, labelset
from kmpops.plans.incident import (
    PHASES,
    TimelineEntry,
    alert_key,
    build_rules,
    default_query,
    hosts_for_alert,
    incident_type_for,
    instance_of,
    notification_for,
    opens_incident,
    plan_containment,
    postmortem_metrics,
    render_diagnostics,
    render_postmortem,
)

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("itype", "severity", "auto", "kinds", "needs"),
    [
        ("bad_release", "critical", [], ["rollback_release", "rollback_release"], True),
        ("bad_release", "critical", ["critical"], ["rollback_release", "rollback_release"], False),
        ("bad_release", "warning", ["critical"], ["rollback_release", "rollback_release"], True),
        ("resource_exhaustion", "warning", [], ["drain_host", "drain_host"], True),
        ("compromised_credentials", "critical", [], ["disable_key", "disable_key"], True),
        ("unknown", "critical", [], [], False),
        ("never-heard-of", "critical", [], [], False),
    ],
)
def test_plan_containment(itype, severity, auto, kinds, needs):
    plan = plan_containment(itype, severity=severity, targets=["a", "b"], auto_containment=auto)
    assert [a.kind for a in plan.actions] == kinds
    assert [a.target for a in plan.actions] == (["a", "b"] if kinds else [])
    assert plan.needs_approval is needs
    assert plan.incident_type in plan.markdown()


def test_plan_containment_targets_by_kind():
    fp = "SHA256:" + "A" * 43
    plan = plan_containment(
        "compromised_credentials",
        severity="critical",
        targets=["prd-1", "prd-2"],
        targets_by_kind={"disable_key": [fp]},
    )
    assert [(a.kind, a.target) for a in plan.actions] == [("disable_key", fp)]
    drain = plan_containment(
        "resource_exhaustion",
        severity="warning",
        targets=["prd-1", "prd-2"],
        targets_by_kind={"disable_key": [fp]},
    )
    assert [(a.kind, a.target) for a in drain.actions] == [
        ("drain_host", "prd-1"),
        ("drain_host", "prd-2"),
    ]


def test_plan_containment_rejects_unknown_action():
    with pytest.raises(ValueError, match="unknown containment action"):
        plan_containment("x", severity="critical", targets=["a"], playbooks={"x": ["reboot"]})


@pytest.mark.parametrize(
    ("rule", "labels", "expected"),
    [
        ("error_rate", {}, "bad_release"),
        ("high_cpu", {}, "resource_exhaustion"),
        ("error_rate", {"incident_type": "hostile_traffic"}, "hostile_traffic"),
        ("error_rate", {"incident_type": "bogus"}, "bad_release"),
        (None, None, "unknown"),
        ("disk_io", {}, "unknown"),
    ],
)
def test_incident_type_for(rule, labels, expected):
    assert incident_type_for(rule, labels) == expected


@pytest.mark.parametrize(
    ("state", "notified", "ago", "expected"),
    [
        ("pending", None, None, None),
        ("firing", None, None, "firing"),
        ("firing", "firing", timedelta(minutes=1), None),
        ("firing", "firing", timedelta(hours=4), "reminder"),
        ("firing", "resolved", timedelta(minutes=1), "firing"),
        ("resolved", "firing", timedelta(minutes=1), "resolved"),
        ("resolved", "resolved", timedelta(minutes=1), None),
        ("resolved", None, None, None),
    ],
)
def test_notification_for(state, notified, ago, expected):
    at = None if ago is None else T0 - ago
    got = notification_for(
        state, notified_state=notified, notified_at=at, now=T0, repeat_interval=timedelta(hours=4)
    )
    assert got == expected


def test_alert_key_is_canonical():
    assert alert_key("r", {"b": "2", "a": "1"}) == alert_key("r", labelset(a="1", b="2"))
    assert alert_key("r", {"alertname": "r", "a": "1"}) == 'r{a="1"}'


def test_default_queries_and_build_rules():
    assert "process_cpu_seconds_total" in default_query("high_cpu")
    assert "web_errors_total" in default_query("error_rate")
    assert default_query("nope") is None
    rules = build_rules(
        {
            "high_cpu": {"threshold": 0.8, "duration": "5m", "severity": "warning"},
            "error_rate": {
                "threshold": 0.01,
                "duration": "1m",
                "severity": "critical",
                "query": "q",
            },
        }
    )
    assert [r.name for r in rules] == ["high_cpu", "error_rate"]
    assert rules[0].duration == timedelta(minutes=5)
    assert rules[1].query == "q"
    with pytest.raises(ValueError, match="no query"):
        build_rules({"disk": {"threshold": 1, "duration": "1m", "severity": "info"}})


def test_opens_incident():
    assert opens_incident("critical") and not opens_incident("warning")
    assert opens_incident("warning", True) and not opens_incident("critical", False)


def test_hosts_for_alert():
    inst = {"127.0.0.1:501": "prd-1", "127.0.0.1:502": "prd-2"}
    assert hosts_for_alert({"instance": "127.0.0.1:502"}, inst) == ["prd-2"]
    assert hosts_for_alert({"host": "stg-1", "instance": "127.0.0.1:502"}, inst) == ["stg-1"]
    assert hosts_for_alert({}, inst, ["prd-1"]) == ["prd-1"]
    assert instance_of("http://127.0.0.1:501/metrics") == "127.0.0.1:501"
    assert instance_of("https://example.org/metrics") == "example.org:443"


@pytest.mark.parametrize(
    ("started", "detected", "contained", "recovered", "expected"),
    [
        (0, 10, 40, 100, (10, 30, 90)),
        (None, 10, 40, 100, (None, 30, 90)),
        (0, 10, None, None, (10, None, None)),
        (20, 10, 40, 100, (0, 30, 90)),  # clock skew: never negative
    ],
)
def test_postmortem_metrics(started, detected, contained, recovered, expected):
    def at(s):
        return None if s is None else T0 + timedelta(seconds=s)

    m = postmortem_metrics(
        started_at=at(started),
        detected_at=at(detected),
        contained_at=at(contained),
        recovered_at=at(recovered),
    )
    got = tuple(
        None if d is None else d.total_seconds()
        for d in (m.time_to_detect, m.time_to_contain, m.time_to_recover)
    )
    assert got == expected


def test_render_postmortem_and_diagnostics():
    timeline = [
        TimelineEntry(T0 + timedelta(seconds=i), phase, f"{phase} | done")
        for i, phase in enumerate(PHASES)
    ]
    m = postmortem_metrics(
        started_at=T0, detected_at=T0, contained_at=T0 + timedelta(seconds=3), recovered_at=None
    )
    md = render_postmortem(
        incident_id=7,
        title="error_rate firing",
        severity="critical",
        incident_type="bad_release",
        timeline=timeline,
        metrics=m,
        approvals=[{"subject": "incident/7/containment", "outcome": "approved", "approver": "bob"}],
        actions=["rolled back prd-1: v2 -> v1"],
    )
    assert md == render_postmortem(
        incident_id=7,
        title="error_rate firing",
        severity="critical",
        incident_type="bad_release",
        timeline=timeline,
        metrics=m,
        approvals=[{"subject": "incident/7/containment", "outcome": "approved", "approver": "bob"}],
        actions=["rolled back prd-1: v2 -> v1"],
    )
    assert "Time to contain:** 3.0 s" in md and "Time to recover:** n/a" in md
    assert [p for p in PHASES if f"| {p} |" in md] == list(PHASES)
    assert "detection \\| done" in md and "| bob |" in md
    diag = render_diagnostics(
        {"prd-1": {"memory": "Mem: 1000", "log": "``` nasty"}},
        releases=[{"host": "prd-1", "version": "v2", "state": "current", "deployed_at": "t"}],
        correlation="release v2",
    )
    assert "## prd-1" in diag and "Mem: 1000" in diag and "| prd-1 | v2 |" in diag
    assert "``` nasty" not in diag


def test_replayed_states_survive_serialisation():
    """What the evaluator stores between runs round-trips and keeps the for: clock."""
    rules = build_rules(
        {"error_rate": {"threshold": 0.01, "duration": "3s", "severity": "critical", "query": "q"}}
    )
    rule = rules[0]
    ls = labelset(instance="a")
    states, _ = evaluate(rule, {ls: 0.3}, {}, T0)
    stored = {k: AlertState.from_dict(v.to_dict()) for k, v in states.items()}
    states, tr = evaluate(rule, {ls: 0.3}, stored, T0 + timedelta(seconds=3))
    assert [t.state for t in tr] == ["firing"]
