"""Alerting steps: query a rule, evaluate it against the stored state, notify, emit the event.

One evaluation of one rule is one task (:func:`evaluate_rule`): it queries Prometheus (or scrapes
the service's /metrics directly when no Prometheus is configured), runs the pure evaluator
(:func:`kmpops.plans.alerts.evaluate`) with the state kept in the records store, decides which
messages are due (one per state change, reminders at ``repeat_interval``, silences honoured)
and saves the new state *with* that bookkeeping before anything is sent, so a retry or a
concurrent evaluator never sends the same change twice. Messages go out through the shared
``notify`` task. :func:`emit_alert_firing` sends the ``kmpops.alert.firing`` Prefect event that
the incident-response deployment trigger (:data:`INCIDENT_TRIGGER`) matches.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from kmpops.config import OpsConfig
from kmpops.connectors import metrics
from kmpops.errors import ConfigError, NotFound
from kmpops.plans.alerts import AlertRule, AlertState, LabelSet, evaluate, labelset
from kmpops.plans.incident import (
    alert_key,
    build_rules,
    instance_of,
    notification_for,
    opens_incident,
)
from kmpops.records.alerting import (
    StoredAlert,
    active_silences,
    load_alert_states,
    matching_silence,
    save_alert_states,
)
from tasks.common import STEP_TIMEOUT_S, audit, ops_config, records, retry_on_transient

__all__ = [
    "ALERT_EVENT",
    "INCIDENT_TRIGGER",
    "AlertChange",
    "AlertMessage",
    "RuleEvaluation",
    "alert_rules",
    "emit_alert_firing",
    "evaluate_rule",
    "incident_trigger",
    "query_rule",
]

ALERT_EVENT = "kmpops.alert.firing"
"""The Prefect event a firing alert that opens incidents emits."""

INCIDENT_TRIGGER: dict[str, Any] = {
    "expect": [ALERT_EVENT],
    "match": {"prefect.resource.id": "kmpops.alert.*"},
    "parameters": {"alert": "{{ event.payload }}"},
}
"""What ``DeploymentEventTrigger(**INCIDENT_TRIGGER)`` on incident-response needs."""

SCRAPE_WINDOW_S = 2.0


def incident_trigger() -> Any:
    """The ``DeploymentEventTrigger`` that starts incident-response on a firing alert."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="kmpops-alert-firing",
        expect=set(INCIDENT_TRIGGER["expect"]),
        match=INCIDENT_TRIGGER["match"],
        parameters=INCIDENT_TRIGGER["parameters"],
    )


def alert_rules(cfg: OpsConfig, names: list[str] | None = None) -> list[AlertRule]:
    """The config's rules (guide names get default queries), optionally only ``names``.

    Raises NotFound naming an unknown rule, ConfigError for a rule without a query."""
    try:
        rules = build_rules(cfg.alerts)
    except ValueError as exc:
        raise ConfigError([f"alerts: {exc}"]) from None
    if names is None:
        return rules
    known = {r.name: r for r in rules}
    missing = [n for n in names if n not in known]
    if missing:
        raise NotFound(f"unknown alert rules: {', '.join(missing)} (known: {', '.join(known)})")
    return [known[n] for n in names]


@dataclass(frozen=True)
class AlertChange:
    """One state change of one alert (JSON-safe, for flow results and events)."""

    rule: str
    key: str
    labels: dict[str, str]
    severity: str
    previous: str
    state: str
    value: float | None
    active_since: str | None
    at: str


@dataclass(frozen=True)
class AlertMessage:
    """A notification that is due: ``kind`` is firing, reminder or resolved."""

    kind: str
    severity: str
    title: str
    body: str
    dedup_key: str


@dataclass(frozen=True)
class RuleEvaluation:
    """What one evaluation of one rule decided."""

    rule: str
    severity: str
    opens_incident: bool
    at: str
    samples: int
    changes: list[AlertChange] = field(default_factory=list)
    messages: list[AlertMessage] = field(default_factory=list)
    silenced: list[str] = field(default_factory=list)
    active: dict[str, str] = field(default_factory=dict)

    def firing(self) -> list[AlertChange]:
        """The changes to firing of this evaluation."""
        return [c for c in self.changes if c.state == "firing"]


def _scrape_values(cfg: OpsConfig, rule: AlertRule) -> dict[LabelSet, float | None]:
    """Direct-scrape fallback (no Prometheus): per instance, the rule's configured ``scrape``
    measurement over a short window (the increase of its counter, divided by the increase of
    ``per`` when given), or, without one, the sum of a query that is a bare metric name.

    Raises ConfigError naming the rule when its query is PromQL and it has no ``scrape``."""
    urls: dict[str, str] = {}
    for svc in cfg.services.values():
        if svc.metrics is None or not svc.metrics.url:
            continue
        for env in cfg.environments.values():
            for host in env.hosts:
                url = svc.render(svc.metrics.url, host)
                urls[instance_of(url)] = url

    def safe_scrape(url: str) -> list[metrics.Sample] | None:
        try:
            return metrics.scrape(url)
        except metrics.MetricsUnavailable:
            return None  # a target that is down has no sample, as in Prometheus

    rule_cfg = cfg.alerts.get(rule.name)
    spec = rule_cfg.scrape if rule_cfg is not None else None
    if spec is not None:
        before = {i: safe_scrape(u) for i, u in urls.items()}
        time.sleep(SCRAPE_WINDOW_S)
        values: dict[LabelSet, float | None] = {}
        for i, u in urls.items():
            earlier = before[i]
            after = safe_scrape(u) if earlier is not None else None
            if earlier is None or after is None:
                continue
            counted = metrics.counter_delta(
                earlier, after, spec.counter.metric, **spec.counter.match
            )
            if spec.per is None:
                values[labelset(instance=i)] = counted
                continue
            per = metrics.counter_delta(earlier, after, spec.per.metric, **spec.per.match)
            # no traffic in the window: no ratio (Prometheus answers NaN, which fires nothing)
            values[labelset(instance=i)] = min(1.0, counted / per) if per > 0 else None
        return values
    name = rule.query.strip()
    if not name.replace("_", "").replace(":", "").isalnum():
        raise ConfigError(
            [
                f"alerts.{rule.name}: without prometheus a PromQL query cannot be asked; give "
                f"alerts.{rule.name}.scrape (counter and per) or a bare metric name as query"
            ]
        )
    out: dict[LabelSet, float | None] = {}
    for i, u in urls.items():
        samples = safe_scrape(u)
        if samples is not None:
            out[labelset(instance=i)] = metrics.sum_values(samples, name)
    return out


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="query-rule",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
    task_run_name="query-{rule_name}",
)
def query_rule(rule_name: str) -> dict[str, float | None]:
    """The rule's query result now: ``alert_key`` -> value (Prometheus, else a direct scrape).

    Retried on MetricsUnavailable; QueryError (a bad query) is not transient."""
    cfg = ops_config()
    (rule,) = alert_rules(cfg, [rule_name])
    return {alert_key(rule.name, ls): v for ls, v in _query(cfg, rule).items()}


def _query(cfg: OpsConfig, rule: AlertRule) -> dict[LabelSet, float | None]:
    rule_cfg = cfg.alerts.get(rule.name)
    scrape_only = rule_cfg is not None and rule_cfg.query is None and rule_cfg.scrape is not None
    if cfg.prometheus is None or scrape_only:
        return _scrape_values(cfg, rule)
    client = metrics.PrometheusClient(cfg.prometheus.url)
    return {
        labelset({k: v for k, v in s.labels.items() if k != "__name__"}): s.value
        for s in client.query(rule.query)
    }


def _labels_text(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(no labels)"


def _message(kind: str, rule: AlertRule, st: AlertState, now: datetime) -> AlertMessage:
    labels = dict(st.labels)
    key = alert_key(rule.name, st.labels)
    value = "n/a" if st.last_value is None else f"{st.last_value:.4g}"
    verb = {"firing": "FIRING", "reminder": "STILL FIRING", "resolved": "RESOLVED"}[kind]
    title = f"[{verb}] {rule.name} ({rule.severity}) {_labels_text(labels)}"
    body = (
        f"Alert {rule.name}: {rule.expr}\n"
        f"labels: {_labels_text(labels)}\nvalue: {value} (threshold {rule.threshold:g})\n"
        f"active since: {st.active_since.isoformat() if st.active_since else 'n/a'}\n"
        + (f"resolved at: {st.resolved_at.isoformat()}\n" if st.resolved_at else "")
    )
    stamp = st.active_since.isoformat() if st.active_since else ""
    dedup = f"{key}|{kind}|{stamp}" + (f"|{now.isoformat()}" if kind == "reminder" else "")
    return AlertMessage(kind, rule.severity, title, body, dedup)


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="evaluate-rule",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
    task_run_name="evaluate-{rule_name}",
)
def evaluate_rule(rule_name: str, at: datetime | None = None) -> RuleEvaluation:
    """Evaluate one rule now (or ``at``): query, evaluate with the stored state, decide the due
    messages, save state + notification bookkeeping in one transaction, audit the changes.

    Idempotent per evaluation time. Raises NotFound (unknown rule), QueryError, and
    MetricsUnavailable after retries (the stored state is then unchanged)."""
    cfg = ops_config()
    (rule,) = alert_rules(cfg, [rule_name])
    spec = cfg.alerts[rule_name]
    now = at or datetime.now(UTC)
    samples = _query(cfg, rule)
    return _evaluate_samples(cfg, rule, samples, now, opens_incident(rule.severity, spec.incident))


def _evaluate_samples(
    cfg: OpsConfig,
    rule: AlertRule,
    samples: Mapping[LabelSet, float | None],
    now: datetime,
    opens: bool,
) -> RuleEvaluation:
    """The body of :func:`evaluate_rule` once the samples are known: evaluate with the stored
    state, decide the due messages, save, audit the changes."""
    rec = records()
    stored = load_alert_states(rec, rule.name)
    previous = {ls: s.state for ls, s in stored.items()}
    states, transitions = evaluate(rule, samples, previous, now)
    silences = active_silences(rec, now)
    repeat = cfg.notifications.repeat_interval
    messages: list[AlertMessage] = []
    silenced: list[str] = []
    new_stored: dict[LabelSet, StoredAlert] = {}
    for ls, st in states.items():
        old = stored.get(ls)
        entry = StoredAlert(
            state=st,
            notified_state=old.notified_state if old else None,
            notified_at=old.notified_at if old else None,
        )
        # a new alert after a resolution starts its own notification cycle
        if old is not None and old.state.active_since != st.active_since:
            entry.notified_state, entry.notified_at = None, None
        kind = notification_for(
            st.state,
            notified_state=entry.notified_state,
            notified_at=entry.notified_at,
            now=now,
            repeat_interval=repeat,
        )
        if kind is not None:
            if matching_silence(silences, rule.name, ls) is not None:
                silenced.append(alert_key(rule.name, ls))
            else:
                messages.append(_message(kind, rule, st, now))
                entry.notified_state = "resolved" if kind == "resolved" else "firing"
                entry.notified_at = now
        new_stored[ls] = entry  # type: ignore[index]
    save_alert_states(rec, rule.name, new_stored)
    changes = [
        AlertChange(
            rule=t.rule,
            key=alert_key(t.rule, t.labels),  # type: ignore[arg-type]
            labels=dict(t.labels),  # type: ignore[call-overload]
            severity=t.severity,
            previous=t.previous,
            state=t.state,
            value=t.value,
            active_since=t.active_since.isoformat() if t.active_since else None,
            at=t.at.isoformat(),
        )
        for t in transitions
    ]
    for change in changes:
        audit(f"alert.{change.state}", change.key, value=change.value, previous=change.previous)
    if silenced:
        get_run_logger().info("silenced: %s", ", ".join(silenced))
    return RuleEvaluation(
        rule=rule.name,
        severity=rule.severity,
        opens_incident=opens,
        at=now.isoformat(),
        samples=len(samples),
        changes=changes,
        messages=messages,
        silenced=silenced,
        active={alert_key(rule.name, ls): st.state for ls, st in states.items()},
    )


def alert_payload(change: AlertChange, source: str = "evaluate-alerts") -> dict[str, Any]:
    """The event payload of a firing alert (also incident-response's ``alert`` parameter)."""
    return {
        "rule": change.rule,
        "labels": change.labels,
        "value": change.value,
        "severity": change.severity,
        "status": "firing",
        "active_since": change.active_since,
        "source": source,
        "key": change.key,
    }


def emit_alert_firing(payload: Mapping[str, Any]) -> str | None:
    """Emit ``kmpops.alert.firing`` with ``payload`` (rule, labels, value, severity, ...).

    The resource is ``kmpops.alert.<rule>`` labelled with the alert key and severity. Returns
    the event id, or None when events are disabled (no API configured)."""
    from prefect.events import emit_event

    rule = str(payload.get("rule") or "manual")
    key = str(payload.get("key") or alert_key(rule, payload.get("labels") or {}))
    event = emit_event(
        event=ALERT_EVENT,
        resource={
            "prefect.resource.id": f"kmpops.alert.{rule}",
            "prefect.resource.name": key,
            "kmpops.alert.severity": str(payload.get("severity") or "warning"),
        },
        payload={**dict(payload), "key": key},
    )
    return None if event is None else str(event.id)


def change_as_dict(change: AlertChange) -> dict[str, Any]:
    """A change as a plain dict (for artifacts)."""
    return asdict(change)


PATCH_SLA_RULE = "security_patch_sla"
"""The alert rule kmp-ops evaluates from the hosts' pending security updates: one alert per
(environment, host, package), its value the days past the environment's patch SLA."""


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="evaluate-patch-sla",
    cache_policy=NO_CACHE,
)
def evaluate_patch_sla(
    samples: list[tuple[dict[str, str], float]],
    severity: str = "warning",
    at: datetime | None = None,
) -> RuleEvaluation:
    """The ``security_patch_sla`` alert rule, evaluated like every configured rule (pending →
    firing → resolved, state kept in the records store, one notification per state change,
    reminders, silences): ``samples`` are (labels, days past the SLA) of every pending security
    update (negative: still within it); the rule fires above 0. An update no longer pending
    resolves its alert. Never opens an incident (a person patches)."""
    rule = AlertRule(
        name=PATCH_SLA_RULE,
        query="days a pending security update is past its environment's patch SLA",
        threshold=0.0,
        comparison=">",
        severity=severity,
    )
    values = {labelset(labels): value for labels, value in samples}
    return _evaluate_samples(ops_config(), rule, values, at or datetime.now(UTC), False)
