"""kmpops.plans.incident as case tables: containment plans, notifications, postmortem numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kmpops.plans.alerts import AlertState, evaluate, labelset
from kmpops.plans.incident import (
    PHASES,
    IncidentScope,
    TimelineEntry,
    alert_key,
    build_rules,
    check_block_address,
    check_key_fingerprint,
    classify_incident,
    containment_plan_for,
    correlate_release,
    default_query,
    hosts_for_alert,
    incident_scope,
    incident_title,
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
    assert default_query("error_rate") is None  # the metric names are the service's
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


# -- from an alert to what containment may touch -------------------------------------------


INVENTORY = {"staging": ["stg-1", "stg-2"], "production": ["prd-1", "prd-2", "prd-3"]}
INSTANCES = {"127.0.0.1:17501": "prd-1", "127.0.0.1:17601": "stg-1"}


@pytest.mark.parametrize(
    ("labels", "requested", "deployed", "env", "hosts", "refused"),
    [
        # no location: the default environment's hosts where the service runs
        ({}, [], ["prd-1", "prd-3", "stg-1"], "production", ["prd-1", "prd-3"], []),
        ({}, [], [], "production", [], []),
        ({"host": "prd-2"}, [], [], "production", ["prd-2"], []),
        ({"instance": "127.0.0.1:17601"}, [], [], "staging", ["stg-1"], []),
        ({"environment": "staging"}, [], ["stg-2", "prd-1"], "staging", ["stg-2"], []),
        ([], ["prd-1", "prd-1", "prd-2"], [], "production", ["prd-1", "prd-2"], []),
        # a name outside the inventory is refused and widens nothing
        ({"host": "intruder"}, [], ["prd-1"], None, [], ["host intruder: not a host of ops.yaml"]),
        (
            {"instance": "10.9.9.9:9100"},
            [],
            ["prd-1"],
            None,
            [],
            ["instance 10.9.9.9:9100: not an instance of a configured host"],
        ),
        (
            {"environment": "everywhere"},
            [],
            ["prd-1"],
            None,
            [],
            ["environment everywhere: not an environment of ops.yaml"],
        ),
        # a label narrows inside one environment only
        (
            {"environment": "staging", "host": "prd-1"},
            [],
            [],
            "staging",
            [],
            ["host prd-1: not a host of staging in ops.yaml"],
        ),
        (
            {"host": "stg-2"},
            ["prd-1"],
            [],
            "production",
            ["prd-1"],
            ["host stg-2: not a host of production in ops.yaml"],
        ),
    ],
)
def test_incident_scope(labels, requested, deployed, env, hosts, refused):
    scope = incident_scope(
        dict(labels),
        inventory=INVENTORY,
        requested_hosts=requested,
        instances=INSTANCES,
        deployed=deployed,
    )
    assert scope.environment == env
    assert list(scope.hosts) == hosts
    assert [r.line().removeprefix("refused ") for r in scope.refused] == refused
    assert set(scope.hosts) <= set(scope.environment_hosts)
    if env:
        assert list(scope.environment_hosts) == INVENTORY[env]


HOSTS = [("127.0.0.1", "host prd-1"), ("10.0.0.5", "host prd-2"), ("10.0.8.0/29", "kmp-ops")]


@pytest.mark.parametrize(
    ("address", "target", "reason"),
    [
        ("203.0.113.7", "203.0.113.7/32", None),
        ("203.0.113.0/24", "203.0.113.0/24", None),
        ("203.0.113.9/24", "203.0.113.0/24", None),
        ("2001:db8::1", "2001:db8::1/128", None),
        ("2001:db8::/64", "2001:db8::/64", None),
        ("0.0.0.0/0", "0.0.0.0/0", "wider than /24 (incidents.widest_block_v4)"),
        ("203.0.112.0/23", "203.0.112.0/23", "wider than /24 (incidents.widest_block_v4)"),
        ("::/0", "::/0", "wider than /64 (incidents.widest_block_v6)"),
        ("127.0.0.1", "127.0.0.1/32", "the address of host prd-1"),
        ("10.0.0.0/24", "10.0.0.0/24", "covers the address of host prd-2 (10.0.0.5/32)"),
        ("10.0.8.3", "10.0.8.3/32", "covers the address of kmp-ops (10.0.8.0/29)"),
        ("127.0.0.2", "127.0.0.2/32", "a loopback address"),
        ("0.0.0.0", "0.0.0.0/32", "the unspecified address"),
        ("224.0.0.1", "224.0.0.1/32", "a multicast address"),
        ("169.254.1.1", "169.254.1.1/32", "a link-local address"),
        ("203.0.113.8; touch /tmp/x", "203.0.113.8; touch /tmp/x", "not an IP address or network"),
        ("", "", "not an IP address or network"),
    ],
)
def test_check_block_address(address, target, reason):
    assert check_block_address(address, protected=HOSTS) == (target, reason)


def test_check_block_address_width_is_config():
    assert check_block_address("203.0.112.0/20", widest_v4=16) == ("203.0.112.0/20", None)
    assert check_block_address("203.0.113.0/24", widest_v4=32)[1] == (
        "wider than /32 (incidents.widest_block_v4)"
    )


FP_ADMIN = "SHA256:" + "a" * 43
FP_OWN = "SHA256:" + "b" * 43
FP_OTHER = "SHA256:" + "c" * 43


@pytest.mark.parametrize(
    ("fingerprint", "reason"),
    [
        (FP_ADMIN, None),
        (FP_OWN, "kmp-ops' own key (it would lock kmp-ops out)"),
        (FP_OTHER, "not a key kmp-ops knows (incidents.known_keys)"),
        ("SHA256:short", "not an OpenSSH SHA256 fingerprint"),
        ("$(id)", "not an OpenSSH SHA256 fingerprint"),
    ],
)
def test_check_key_fingerprint(fingerprint, reason):
    known = {FP_ADMIN: "admin", FP_OWN: "kmp-ops"}
    assert check_key_fingerprint(fingerprint, known=known, own={FP_OWN}) == reason


@pytest.mark.parametrize(
    ("rule", "labels", "expected"),
    [
        ("error_rate", {}, ("bad_release", False)),
        ("error_rate", {"incident_type": "bad_release"}, ("bad_release", False)),
        (
            "anything",
            {"incident_type": "compromised_credentials"},
            ("compromised_credentials", True),
        ),
        ("error_rate", {"incident_type": "hostile_traffic"}, ("hostile_traffic", True)),
        ("error_rate", {"incident_type": "nonsense"}, ("bad_release", False)),
        (None, {}, ("unknown", False)),
    ],
)
def test_classify_incident(rule, labels, expected):
    assert classify_incident(rule, labels) == expected


PRD = IncidentScope("production", ("prd-1", "prd-2"), ("prd-1", "prd-2", "prd-3"))


@pytest.mark.parametrize(
    ("rule", "labels", "auto", "actions", "needs", "refused"),
    [
        # inventory targets, policy allows: automatic
        (
            "error_rate",
            {},
            ["critical"],
            [("rollback_release", "prd-1", ()), ("rollback_release", "prd-2", ())],
            False,
            [],
        ),
        (
            "high_cpu",
            {},
            [],
            [("drain_host", "prd-1", ()), ("drain_host", "prd-2", ())],
            True,
            [],
        ),
        # a label-chosen address: checked, and an approval whatever the policy
        (
            "request_flood",
            {"address": "203.0.113.7"},
            ["critical"],
            [("block_address", "203.0.113.7/32", ("prd-1", "prd-2"))],
            True,
            [],
        ),
        (
            "request_flood",
            {"address": "0.0.0.0/0"},
            ["critical"],
            [],
            False,
            ["block_address 0.0.0.0/0: wider than /24 (incidents.widest_block_v4)"],
        ),
        (
            "request_flood",
            {"source_ip": "127.0.0.1"},
            ["critical"],
            [],
            False,
            ["block_address 127.0.0.1/32: the address of host prd-1"],
        ),
        (
            "request_flood",
            {},
            ["critical"],
            [],
            False,
            ["block_address -: no address in the alert's labels"],
        ),
        # keys: known ones on every host of the environment, with an approval
        (
            "auth_failures",
            {"fingerprint": FP_ADMIN},
            ["critical"],
            [("disable_key", FP_ADMIN, ("prd-1", "prd-2", "prd-3"))],
            True,
            [],
        ),
        (
            "auth_failures",
            {"fingerprint": FP_OWN},
            ["critical"],
            [],
            False,
            [f"disable_key {FP_OWN}: kmp-ops' own key (it would lock kmp-ops out)"],
        ),
        (
            "auth_failures",
            {"fingerprint": FP_OTHER},
            ["critical"],
            [],
            False,
            [f"disable_key {FP_OTHER}: not a key kmp-ops knows (incidents.known_keys)"],
        ),
        # an incident type chosen by a label needs an approval even for inventory targets
        (
            "high_latency",
            {"incident_type": "resource_exhaustion"},
            ["critical"],
            [("drain_host", "prd-1", ()), ("drain_host", "prd-2", ())],
            True,
            [],
        ),
    ],
)
def test_containment_plan_for(rule, labels, auto, actions, needs, refused):
    plan = containment_plan_for(
        rule,
        labels,
        severity="critical",
        scope=PRD,
        auto_containment=auto,
        protected=[("127.0.0.1", "host prd-1")],
        known_keys={FP_ADMIN: "admin"},
        own_keys={FP_OWN},
    )
    assert [(a.kind, a.target, a.hosts) for a in plan.actions] == actions
    assert plan.needs_approval is needs
    assert [r.line().removeprefix("refused ") for r in plan.refused] == refused
    if needs and auto:
        assert plan.reason.startswith("required (targets chosen from the alert's labels")
    for line in refused:
        assert f"refused {line}" in plan.markdown()


def test_containment_plan_for_an_alert_outside_the_inventory():
    scope = incident_scope({"host": "intruder"}, inventory=INVENTORY)
    plan = containment_plan_for(
        "request_flood",
        {"address": "203.0.113.7", "host": "intruder"},
        severity="critical",
        scope=scope,
        auto_containment=["critical"],
    )
    assert plan.actions == ()
    assert [r.line() for r in plan.refused] == [
        "refused host intruder: not a host of ops.yaml",
        "refused block_address 203.0.113.7/32: no affected host to block on",
    ]


T_DEPLOY = "2026-11-27T11:50:00+00:00"


@pytest.mark.parametrize(
    ("releases", "active_since", "expected"),
    [
        ([], T0, "no release recorded on the affected hosts"),
        (
            [{"version": "2.0.0", "host": "prd-1", "deployed_at": T_DEPLOY}],
            T0,
            "release 2.0.0 deployed on prd-1 at 11:50:00 UTC, 600 s before the alert became "
            "active (likely cause)",
        ),
        (
            [{"version": "2.0.0", "host": "prd-1", "deployed_at": T_DEPLOY}],
            T0 + timedelta(hours=2),
            "release 2.0.0 deployed on prd-1 at 11:50:00 UTC, 7800 s before the alert became "
            "active (probably unrelated)",
        ),
        (
            [{"version": "2.0.0", "host": "prd-1", "deployed_at": T_DEPLOY}],
            None,
            "latest release: 2.0.0 on prd-1",
        ),
    ],
)
def test_correlate_release(releases, active_since, expected):
    assert correlate_release(releases, active_since) == expected


def test_incident_title():
    assert incident_title("error_rate", {"b": "2", "a": "1"}) == "error_rate firing (a=1, b=2)"
    assert incident_title("outage", {}) == "outage firing"
    assert incident_title(None, {}) == "manual incident"
    assert incident_title("x", {}, "disk full") == "disk full"
