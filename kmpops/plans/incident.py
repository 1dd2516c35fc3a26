"""Incident decisions: alert → incident type → containment plan, escalation, postmortem numbers.

Pure code, no I/O. ``incident-response`` asks these functions what to do and records what it did;
the postmortem is computed from the incident's own timeline (what happened, in order) so a rerun on
the same records renders the same document.

- :func:`default_query` gives the guide's rule names a PromQL query (``high_cpu``: the CPU ratio
  from ``process_cpu_seconds_total``; ``error_rate``: errors / requests), :func:`build_rules` turns
  the ``alerts:`` block into :class:`~kmpops.plans.alerts.AlertRule` objects.
- :func:`incident_type_for` classifies an alert (``bad_release``, ``resource_exhaustion``,
  ``compromised_credentials``, ``hostile_traffic``, ``unknown``) and :func:`plan_containment`
  lists the configured actions for that type, each marked destructive or not, and whether the
  plan needs an approval (destructive and the severity not in ``policy.auto_containment``).
- :func:`postmortem_metrics` computes time to detect / contain / recover and
  :func:`render_postmortem` / :func:`render_diagnostics` write the markdown.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from kmpops.plans.alerts import AlertRule, parse_duration

__all__ = [
    "ACTIONS",
    "ESCALATION_LEVELS",
    "PHASES",
    "PLAYBOOKS",
    "ContainmentAction",
    "ContainmentPlan",
    "PostmortemMetrics",
    "TimelineEntry",
    "alert_key",
    "build_rules",
    "default_query",
    "eradication_steps",
    "hosts_for_alert",
    "incident_type_for",
    "instance_of",
    "notification_for",
    "opens_incident",
    "plan_containment",
    "postmortem_metrics",
    "render_diagnostics",
    "render_postmortem",
]

PHASES = ("detection", "analysis", "containment", "eradication", "recovery", "lessons_learned")
"""The six phases of the guide's incident response, in order."""

ESCALATION_LEVELS = ("L1", "L2", "L3")
"""Support levels, in escalation order."""

ActionKind = Literal["rollback_release", "drain_host", "disable_key", "block_address"]

ACTIONS: dict[str, tuple[str, bool]] = {
    # kind: (what it does, destructive)
    "rollback_release": ("roll back the latest release on the affected hosts", True),
    "drain_host": ("take the affected hosts out of rotation", True),
    "disable_key": ("disable the compromised service-account key", True),
    "block_address": ("block the offending address", True),
}

PLAYBOOKS: dict[str, tuple[str, ...]] = {
    "bad_release": ("rollback_release",),
    "resource_exhaustion": ("drain_host",),
    "compromised_credentials": ("disable_key",),
    "hostile_traffic": ("block_address",),
    "unknown": (),
}
"""Incident type -> containment actions (the guide's examples)."""

_RULE_TYPES = {
    "error_rate": "bad_release",
    "latency": "bad_release",
    "high_latency": "bad_release",
    "high_cpu": "resource_exhaustion",
    "high_memory": "resource_exhaustion",
    "disk_full": "resource_exhaustion",
    "auth_failures": "compromised_credentials",
    "credential_leak": "compromised_credentials",
    "request_flood": "hostile_traffic",
}

_ERADICATION: dict[str, tuple[str, ...]] = {
    "bad_release": (
        "mark the faulty release as bad so it is not redeployed",
        "confirm every affected host runs the known-good release",
    ),
    "resource_exhaustion": ("identify and stop the runaway process", "clean up temporary files"),
    "compromised_credentials": ("rotate the affected credentials", "review access logs"),
    "hostile_traffic": ("review firewall rules", "report the address"),
    "unknown": ("root-cause analysis by the on-call engineer",),
}

_DEFAULT_QUERIES = {
    "high_cpu": "sum by (instance) (rate(process_cpu_seconds_total[1m]))",
    "error_rate": (
        "sum by (instance) (rate(web_errors_total[1m]))"
        " / sum by (instance) (rate(web_requests_total[1m]))"
    ),
}


def default_query(rule_name: str) -> str | None:
    """The PromQL query of a guide rule name (``high_cpu``, ``error_rate``), else None.

    ``high_cpu`` is CPU seconds per second per instance (a ratio of one core, so ``80%`` means
    0.8 of a core); ``error_rate`` is 5xx answers / requests per instance.
    """
    return _DEFAULT_QUERIES.get(rule_name)


def build_rules(alerts: Mapping[str, Any]) -> list[AlertRule]:
    """Alert rules from the ``alerts:`` block (``AlertRuleConfig`` models or plain mappings).

    A rule without ``query`` gets :func:`default_query`; raises ValueError naming a rule that
    has neither.
    """
    rules = []
    for name, spec in alerts.items():
        data = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
        query = data.get("query") or default_query(name)
        if not query:
            raise ValueError(f"alert rule {name!r}: no query given and no default for this name")
        rules.append(
            AlertRule(
                name=name,
                query=query,
                threshold=float(data["threshold"]),
                comparison=data.get("comparison", ">"),
                duration=parse_duration(data.get("duration", "0")),
                severity=str(data.get("severity", "warning")),
            )
        )
    return rules


def opens_incident(severity: str, incident: bool | None = None) -> bool:
    """Whether a firing alert starts incident-response: the rule's ``incident`` flag, else
    only critical alerts."""
    return incident if incident is not None else severity == "critical"


def notification_for(
    state: str,
    *,
    notified_state: str | None,
    notified_at: datetime | None,
    now: datetime,
    repeat_interval: timedelta,
) -> str | None:
    """Which message an alert needs now: ``firing`` (it started firing, not yet notified),
    ``reminder`` (still firing, last message ``repeat_interval`` ago), ``resolved`` (it ended and
    its firing was notified) or None. Pending alerts are not notified (Alertmanager's rule).
    """
    if state == "firing":
        if notified_state != "firing" or notified_at is None:
            return "firing"
        if now - notified_at >= repeat_interval:
            return "reminder"
        return None
    if state == "resolved" and notified_state == "firing":
        return "resolved"
    return None


def alert_key(rule: str, labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """A stable key of one alert: ``rule{a="x",b="y"}`` with labels sorted (the dedup key)."""
    pairs = sorted(dict(labels).items() if not isinstance(labels, Mapping) else labels.items())
    inner = ",".join(f"{k}={json.dumps(str(v))}" for k, v in pairs if k != "alertname")
    return f"{rule}{{{inner}}}"


def incident_type_for(rule: str | None, labels: Mapping[str, str] | None = None) -> str:
    """The incident type of an alert: an ``incident_type`` label wins, then the rule name."""
    if labels and labels.get("incident_type") in PLAYBOOKS:
        return labels["incident_type"]
    return _RULE_TYPES.get(rule or "", "unknown")


def hosts_for_alert(
    labels: Mapping[str, str], instances: Mapping[str, str], all_hosts: Sequence[str] = ()
) -> list[str]:
    """The hosts an alert is about: its ``host`` label, else its ``instance`` label looked up in
    ``instances`` (``"address:port"`` -> host name), else ``all_hosts`` (an alert without a
    location concerns the whole service)."""
    if labels.get("host"):
        return [labels["host"]]
    instance = labels.get("instance")
    if instance and instance in instances:
        return [instances[instance]]
    return list(all_hosts)


def instance_of(url: str) -> str:
    """``address:port`` of a URL (what Prometheus puts in the ``instance`` label)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


@dataclass(frozen=True)
class ContainmentAction:
    """One containment step on one target (a host, a key, an address)."""

    kind: str
    target: str
    description: str
    destructive: bool


@dataclass(frozen=True)
class ContainmentPlan:
    """What containment will do and whether it needs an approval first."""

    incident_type: str
    severity: str
    actions: tuple[ContainmentAction, ...]
    needs_approval: bool
    reason: str

    def markdown(self) -> str:
        """The plan as markdown (shown in the approval form and the timeline)."""
        lines = [
            f"**Containment plan** — incident type `{self.incident_type}`, {self.severity}",
            "",
        ]
        if not self.actions:
            lines.append("_No automatic containment action for this incident type._")
        for act in self.actions:
            mark = " (destructive)" if act.destructive else ""
            lines.append(f"- `{act.kind}` on `{act.target}`: {act.description}{mark}")
        lines += ["", f"Approval: {self.reason}."]
        return "\n".join(lines)


def plan_containment(
    incident_type: str,
    *,
    severity: str,
    targets: Sequence[str],
    auto_containment: Iterable[str] = (),
    playbooks: Mapping[str, Sequence[str]] | None = None,
    targets_by_kind: Mapping[str, Sequence[str]] | None = None,
) -> ContainmentPlan:
    """The containment actions for ``incident_type`` on each target, in playbook order.

    ``targets`` are the affected hosts; ``targets_by_kind`` gives other targets for an action
    kind (``disable_key``: key fingerprints, ``block_address``: addresses).

    Needs an approval when any action is destructive and ``severity`` is not listed in the
    environment policy's ``auto_containment``. Raises ValueError for an unknown action kind in
    a custom playbook.
    """
    book = PLAYBOOKS if playbooks is None else playbooks
    kinds = tuple(book.get(incident_type, ()))
    actions = []
    for kind in kinds:
        if kind not in ACTIONS:
            raise ValueError(f"unknown containment action {kind!r} for {incident_type!r}")
        text, destructive = ACTIONS[kind]
        on = (targets_by_kind or {}).get(kind, targets)
        actions.extend(ContainmentAction(kind, t, text, destructive) for t in on)
    destructive = any(a.destructive for a in actions)
    auto = severity in set(auto_containment)
    if not destructive:
        needs, reason = False, "not needed (no destructive action)"
    elif auto:
        needs, reason = False, f"not needed (policy allows automatic containment for {severity})"
    else:
        needs, reason = True, f"required (destructive actions; {severity} is not auto-contained)"
    return ContainmentPlan(incident_type, severity, tuple(actions), needs, reason)


def eradication_steps(incident_type: str) -> tuple[str, ...]:
    """The eradication checklist of an incident type."""
    return _ERADICATION.get(incident_type, _ERADICATION["unknown"])


@dataclass(frozen=True)
class TimelineEntry:
    """One line of an incident's timeline."""

    ts: datetime
    phase: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PostmortemMetrics:
    """Durations of an incident (None when the phase never completed)."""

    time_to_detect: timedelta | None
    time_to_contain: timedelta | None
    time_to_recover: timedelta | None


def postmortem_metrics(
    *,
    started_at: datetime | None,
    detected_at: datetime | None,
    contained_at: datetime | None,
    recovered_at: datetime | None,
) -> PostmortemMetrics:
    """Time to detect (problem start -> incident opened), to contain and to recover (both from
    detection). A missing start makes time to detect None; negative spans (clock skew) are 0."""

    def span(a: datetime | None, b: datetime | None) -> timedelta | None:
        if a is None or b is None:
            return None
        return max(b - a, timedelta(0))

    return PostmortemMetrics(
        time_to_detect=span(started_at, detected_at),
        time_to_contain=span(detected_at, contained_at),
        time_to_recover=span(detected_at, recovered_at),
    )


def _fmt_span(delta: timedelta | None) -> str:
    if delta is None:
        return "n/a"
    total = delta.total_seconds()
    if total < 120:
        return f"{total:.1f} s"
    return f"{total / 60:.1f} min"


def _fmt_ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_postmortem(
    *,
    incident_id: int,
    title: str,
    severity: str,
    incident_type: str,
    timeline: Sequence[TimelineEntry],
    metrics: PostmortemMetrics,
    approvals: Sequence[Mapping[str, Any]] = (),
    actions: Sequence[str] = (),
    before_after: Mapping[str, Any] | None = None,
    action_items: Sequence[str] = (),
) -> str:
    """The postmortem draft as markdown: summary, metrics, timeline, actions, approvals,
    before/after values and action items. Deterministic for the same input."""
    lines = [
        f"# Postmortem: incident #{incident_id} — {title}",
        "",
        f"- **Severity:** {severity}",
        f"- **Type:** {incident_type}",
        f"- **Time to detect:** {_fmt_span(metrics.time_to_detect)}",
        f"- **Time to contain:** {_fmt_span(metrics.time_to_contain)}",
        f"- **Time to recover:** {_fmt_span(metrics.time_to_recover)}",
        "",
        "## Timeline",
        "",
        "| time | phase | event |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {_fmt_ts(e.ts)} | {e.phase} | {_cell(e.message)} |" for e in timeline]
    lines += ["", "## Actions taken", ""]
    lines += [f"- {a}" for a in actions] or ["- none"]
    lines += ["", "## Approvals", ""]
    if approvals:
        lines += ["| subject | outcome | approver | reason |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {_cell(a.get('subject', ''))} | {_cell(a.get('outcome', ''))} | "
            f"{_cell(a.get('approver') or '')} | {_cell(a.get('reason') or '')} |"
            for a in approvals
        ]
    else:
        lines.append("- none")
    if before_after:
        lines += ["", "## Metrics before / after", ""]
        lines += [f"- {k}: {v}" for k, v in before_after.items()]
    lines += ["", "## Action items", ""]
    lines += [f"- [ ] {item}" for item in action_items] or ["- [ ] root-cause analysis"]
    return "\n".join(lines) + "\n"


def render_diagnostics(
    diagnostics: Mapping[str, Mapping[str, str]],
    *,
    releases: Sequence[Mapping[str, Any]] = (),
    changes: Sequence[Mapping[str, Any]] = (),
    correlation: str = "",
) -> str:
    """Diagnostics markdown: one section per host (a code block per probe), then the recent
    releases and changes from the records store and the deployment correlation."""
    lines = ["# Incident diagnostics", ""]
    if correlation:
        lines += [f"**Correlation:** {correlation}", ""]
    for host in sorted(diagnostics):
        lines += [f"## {host}", ""]
        for probe, output in diagnostics[host].items():
            text = output.rstrip().replace("```", "'''") or "(no output)"
            lines += [f"### {probe}", "", "```", text, "```", ""]
    lines += ["## Recent releases", ""]
    if releases:
        lines += [
            "| host | version | state | deployed at | by |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(r.get('host'))} | {_cell(r.get('version'))} | {_cell(r.get('state'))} | "
            f"{_cell(r.get('deployed_at'))} | {_cell(r.get('deployed_by', ''))} |"
            for r in releases
        ]
    else:
        lines.append("- none recorded")
    lines += ["", "## Recent changes", ""]
    lines += [
        f"- {_cell(c.get('ts'))} {_cell(c.get('action'))} {_cell(c.get('subject'))}"
        for c in changes
    ] or ["- none recorded"]
    return "\n".join(lines) + "\n"
