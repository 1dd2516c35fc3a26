"""Incident decisions: alert → incident type → containment plan, escalation, postmortem numbers.

Pure code, no I/O. ``incident-response`` asks these functions what to do and records what it did;
the postmortem is computed from the incident's own timeline (what happened, in order) so a rerun on
the same records renders the same document.

- :func:`default_query` gives ``high_cpu`` a PromQL query (the CPU ratio from the standard client
  metric ``process_cpu_seconds_total``); every other rule, ``error_rate`` included, names its own
  query in config (no service's metric names are assumed here), :func:`build_rules` turns
  the ``alerts:`` block into :class:`~kmpops.plans.alerts.AlertRule` objects.
- :func:`incident_type_for` classifies an alert (``bad_release``, ``resource_exhaustion``,
  ``compromised_credentials``, ``hostile_traffic``, ``unknown``) and :func:`plan_containment`
  lists the configured actions for that type, each marked destructive or not, and whether the
  plan needs an approval (destructive and the severity not in ``policy.auto_containment``).
- :func:`postmortem_metrics` computes time to detect / contain / recover and
  :func:`render_postmortem` / :func:`render_diagnostics` write the markdown.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Collection, Iterable, Mapping, Sequence
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
    "IncidentScope",
    "PostmortemMetrics",
    "Refusal",
    "TimelineEntry",
    "alert_key",
    "build_rules",
    "check_block_address",
    "check_key_fingerprint",
    "classify_incident",
    "containment_plan_for",
    "correlate_release",
    "default_query",
    "eradication_steps",
    "hosts_for_alert",
    "incident_scope",
    "incident_title",
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
}


def default_query(rule_name: str) -> str | None:
    """The PromQL query of a rule name that has a default (only ``high_cpu``), else None.

    ``high_cpu`` is CPU seconds per second per instance (a ratio of one core, so ``80%`` means
    0.8 of a core), from ``process_cpu_seconds_total``, which every Prometheus client library
    exports. An error ratio depends on the service's own metric names, so ``error_rate`` has no
    default: its query comes from config.
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
        if not query and data.get("scrape"):
            query = f"scrape:{name}"  # measured by two scrapes (no Prometheus), see scrape
        if not query:
            raise ValueError(
                f"alert rule {name!r}: no query given and no default for this name "
                f"(set alerts.{name}.query)"
            )
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
class Refusal:
    """A containment target (host, address, key, environment) refused, and why."""

    kind: str
    target: str
    reason: str

    def line(self) -> str:
        """The timeline line: ``refused <kind> <target>: <reason>``."""
        return f"refused {self.kind} {self.target}: {self.reason}"


@dataclass(frozen=True)
class ContainmentAction:
    """One containment step on one target (a host, a key, an address)."""

    kind: str
    target: str
    description: str
    destructive: bool
    hosts: tuple[str, ...] = ()
    """Where an address is blocked / a key removed (empty: on ``target`` itself, a host)."""


@dataclass(frozen=True)
class ContainmentPlan:
    """What containment will do and whether it needs an approval first."""

    incident_type: str
    severity: str
    actions: tuple[ContainmentAction, ...]
    needs_approval: bool
    reason: str
    refused: tuple[Refusal, ...] = ()

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
            where = f" on hosts {', '.join(act.hosts)}" if act.hosts else ""
            lines.append(f"- `{act.kind}` on `{act.target}`{where}: {act.description}{mark}")
        for ref in self.refused:
            lines.append(f"- **{ref.line()}**")
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
    hosts_by_kind: Mapping[str, Sequence[str]] | None = None,
    from_labels: Sequence[str] = (),
    refused: Sequence[Refusal] = (),
) -> ContainmentPlan:
    """The containment actions for ``incident_type`` on each target, in playbook order.

    ``targets`` are the affected hosts; ``targets_by_kind`` gives other targets for an action
    kind (``disable_key``: key fingerprints, ``block_address``: addresses), ``hosts_by_kind``
    the hosts such an action runs on. ``refused`` are targets already refused (shown in the
    plan, never acted on).

    The policy choice: an approval is needed when any action is destructive and either
    ``severity`` is not listed in the environment policy's ``auto_containment`` or
    ``from_labels`` names something the alert's labels chose (an address, a key, the incident
    type) — a label never gets a destructive step past a person, whatever the policy says.
    Raises ValueError for an unknown action kind in a custom playbook.
    """
    book = PLAYBOOKS if playbooks is None else playbooks
    kinds = tuple(book.get(incident_type, ()))
    actions = []
    for kind in kinds:
        if kind not in ACTIONS:
            raise ValueError(f"unknown containment action {kind!r} for {incident_type!r}")
        text, destructive = ACTIONS[kind]
        on = (targets_by_kind or {}).get(kind, targets)
        where = tuple((hosts_by_kind or {}).get(kind, ()))
        actions.extend(ContainmentAction(kind, t, text, destructive, where) for t in on)
    destructive = any(a.destructive for a in actions)
    auto = severity in set(auto_containment)
    if not destructive:
        needs, reason = False, "not needed (no destructive action)"
    elif from_labels:
        needs, reason = (
            True,
            f"required (targets chosen from the alert's labels: {', '.join(from_labels)}; "
            "a label never skips the approval)",
        )
    elif auto:
        needs, reason = False, f"not needed (policy allows automatic containment for {severity})"
    else:
        needs, reason = True, f"required (destructive actions; {severity} is not auto-contained)"
    return ContainmentPlan(incident_type, severity, tuple(actions), needs, reason, tuple(refused))


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


# -- from an alert to what may be touched (the trust boundary) ------------------------------
#
# An alert's labels are data from outside (Prometheus series labels, an Alertmanager webhook, a
# UI form). They may narrow what containment touches to part of the inventory in ops.yaml; they
# never add a host, and a target they choose (an address, a key) is checked against config and
# always needs a person's approval.

_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def classify_incident(
    rule: str | None, labels: Mapping[str, str] | None = None
) -> tuple[str, bool]:
    """(incident type, chosen by a label): the type :func:`incident_type_for` gives, and whether
    an ``incident_type`` label picked it over the rule's own type (then its destructive steps
    are label-chosen and need an approval)."""
    chosen = incident_type_for(rule, labels)
    by_rule = incident_type_for(rule, None)
    return chosen, chosen != by_rule


@dataclass(frozen=True)
class IncidentScope:
    """The part of the inventory an incident may touch.

    ``environment`` is an environment of ops.yaml (None: none could be chosen), ``hosts`` the
    affected hosts (a subset of ``environment_hosts``, the environment's hosts in ops.yaml),
    ``refused`` the names the alert gave that are not in that inventory."""

    environment: str | None
    hosts: tuple[str, ...]
    environment_hosts: tuple[str, ...]
    refused: tuple[Refusal, ...] = ()


def incident_scope(
    labels: Mapping[str, str],
    *,
    inventory: Mapping[str, Sequence[str]],
    requested_hosts: Sequence[str] = (),
    instances: Mapping[str, str] | None = None,
    deployed: Collection[str] = (),
    default_environment: str = "production",
) -> IncidentScope:
    """Which environment and hosts an alert is about, from the inventory only.

    ``inventory`` is environment -> host names (ops.yaml). The alert may narrow: an
    ``environment`` label, a ``host`` label, an ``instance`` label (looked up in ``instances``,
    ``address:port`` -> host) and ``requested_hosts`` (a manual report's hosts). A name that is
    not in the inventory is refused and does not widen anything: if every name given is
    refused, no host is affected. Without a name, the affected hosts are the environment's
    hosts where the service is ``deployed`` (records narrow too, never widen).

    The environment: the ``environment`` label, else the environment of the first known host
    named, else ``default_environment``, else the only environment; otherwise none.
    """
    refused: list[Refusal] = []
    where = {h: env for env, hosts in inventory.items() for h in hosts}
    named: list[str] = []
    for host in requested_hosts:
        named.append(str(host))
    if labels.get("host"):
        named.append(labels["host"])
    instance = labels.get("instance")
    if instance:
        if instances and instance in instances:
            named.append(instances[instance])
        else:
            refused.append(Refusal("instance", instance, "not an instance of a configured host"))
    environment: str | None = None
    label_env = labels.get("environment")
    if label_env:
        if label_env in inventory:
            environment = label_env
        else:
            refused.append(Refusal("environment", label_env, "not an environment of ops.yaml"))
            return IncidentScope(None, (), (), tuple(refused))
    if environment is None:
        known = [where[h] for h in named if h in where]
        if known:
            environment = known[0]
        elif not named and not refused:
            if default_environment in inventory:
                environment = default_environment
            elif len(inventory) == 1:
                environment = next(iter(inventory))
    if environment is None:
        for host in named:
            if host not in where:
                refused.append(Refusal("host", host, "not a host of ops.yaml"))
        if not named and not refused:
            refused.append(Refusal("environment", "-", "no environment given or configured"))
        return IncidentScope(None, (), (), tuple(refused))
    env_hosts = tuple(inventory[environment])
    hosts: list[str] = []
    for host in named:
        if host in env_hosts:
            if host not in hosts:
                hosts.append(host)
        else:
            refused.append(Refusal("host", host, f"not a host of {environment} in ops.yaml"))
    if not named and not refused:
        hosts = [h for h in env_hosts if h in set(deployed)]
    return IncidentScope(environment, tuple(hosts), env_hosts, tuple(refused))


def check_block_address(
    address: str,
    *,
    widest_v4: int = 24,
    widest_v6: int = 64,
    protected: Sequence[tuple[str, str]] = (),
) -> tuple[str, str | None]:
    """(network, None) for an address containment may block, else (target, the reason) where
    target is the normalised network when the text parses, the text itself otherwise.

    The address must be one IP address or a network no wider than ``widest_v4`` /
    ``widest_v6`` (prefix length at least that), must not cover any ``protected`` address
    (``(network, whose)`` pairs: kmp-ops' own addresses and the hosts'), and must not be a
    loopback, unspecified, multicast or link-local address. The network is normalised
    (``203.0.113.7`` -> ``203.0.113.7/32``).
    """
    try:
        net = ipaddress.ip_network(address.strip(), strict=False)
    except ValueError:
        return address, "not an IP address or network"
    widest = widest_v4 if net.version == 4 else widest_v6
    if net.prefixlen < widest:
        return str(net), f"wider than /{widest} (incidents.widest_block_v{net.version})"
    for text, whose in protected:
        try:
            own = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if own.version == net.version and net.overlaps(own):
            if net.num_addresses == 1 and own.num_addresses == 1:
                return str(net), f"the address of {whose}"
            return str(net), f"covers the address of {whose} ({own})"
    for attr, what in (
        ("is_loopback", "a loopback address"),
        ("is_unspecified", "the unspecified address"),
        ("is_multicast", "a multicast address"),
        ("is_link_local", "a link-local address"),
    ):
        if getattr(net.network_address, attr) or getattr(net.broadcast_address, attr):
            return str(net), what
    return str(net), None


def check_key_fingerprint(
    fingerprint: str, *, known: Mapping[str, str], own: Collection[str]
) -> str | None:
    """None when containment may disable the key ``fingerprint``, else the reason.

    It must be an OpenSSH SHA256 fingerprint, never one of kmp-ops' ``own`` keys (that would
    lock kmp-ops out of its hosts) and one of the ``known`` keys (fingerprint -> owner, from
    ``incidents.known_keys``)."""
    if not _FINGERPRINT.fullmatch(fingerprint):
        return "not an OpenSSH SHA256 fingerprint"
    if fingerprint in set(own):
        return "kmp-ops' own key (it would lock kmp-ops out)"
    if fingerprint not in known:
        return "not a key kmp-ops knows (incidents.known_keys)"
    return None


def containment_plan_for(
    rule: str | None,
    labels: Mapping[str, str],
    *,
    severity: str,
    scope: IncidentScope,
    auto_containment: Iterable[str] = (),
    widest_v4: int = 24,
    widest_v6: int = 64,
    protected: Sequence[tuple[str, str]] = (),
    known_keys: Mapping[str, str] | None = None,
    own_keys: Collection[str] = (),
    playbooks: Mapping[str, Sequence[str]] | None = None,
) -> ContainmentPlan:
    """The containment plan of an alert: incident type, targets, refusals and the policy choice.

    Hosts come from ``scope`` (the inventory). A ``block_address`` takes the ``address`` (or
    ``source_ip``) label checked by :func:`check_block_address` and runs on the affected
    hosts; a ``disable_key`` takes the ``fingerprint`` label checked by
    :func:`check_key_fingerprint` and runs on every host of the scope's environment. A
    refused or missing target is listed in ``refused`` and not acted on. Whatever the labels
    chose (the incident type, an address, a key) makes the plan need an approval.
    """
    incident_type, type_from_label = classify_incident(rule, labels)
    book = PLAYBOOKS if playbooks is None else playbooks
    kinds = tuple(book.get(incident_type, ()))
    refused = list(scope.refused)
    chosen: list[str] = ["incident type"] if type_from_label else []
    by_kind: dict[str, list[str]] = {}
    hosts_by_kind: dict[str, Sequence[str]] = {}
    if "block_address" in kinds:
        address = labels.get("address") or labels.get("source_ip")
        by_kind["block_address"] = []
        if not address:
            refused.append(Refusal("block_address", "-", "no address in the alert's labels"))
        else:
            net, why = check_block_address(
                address, widest_v4=widest_v4, widest_v6=widest_v6, protected=protected
            )
            if why is not None:
                refused.append(Refusal("block_address", net, why))
            elif not scope.hosts:
                refused.append(Refusal("block_address", str(net), "no affected host to block on"))
            else:
                by_kind["block_address"] = [str(net)]
                hosts_by_kind["block_address"] = scope.hosts
                chosen.append("address")
    if "disable_key" in kinds:
        fingerprint = labels.get("fingerprint")
        by_kind["disable_key"] = []
        if not fingerprint:
            refused.append(Refusal("disable_key", "-", "no key fingerprint in the alert's labels"))
        else:
            why = check_key_fingerprint(fingerprint, known=known_keys or {}, own=own_keys)
            if why is not None:
                refused.append(Refusal("disable_key", fingerprint, why))
            elif not scope.environment_hosts:
                refused.append(Refusal("disable_key", fingerprint, "no environment to act in"))
            else:
                by_kind["disable_key"] = [fingerprint]
                hosts_by_kind["disable_key"] = scope.environment_hosts
                chosen.append("key fingerprint")
    return plan_containment(
        incident_type,
        severity=severity,
        targets=scope.hosts,
        auto_containment=auto_containment,
        playbooks=book,
        targets_by_kind=by_kind,
        hosts_by_kind=hosts_by_kind,
        from_labels=chosen,
        refused=refused,
    )


def correlate_release(releases: Sequence[Mapping[str, Any]], active_since: datetime | None) -> str:
    """The deployment correlation line of the analysis phase.

    ``releases`` newest first (``version``, ``host``, ``deployed_at`` ISO text). The latest
    release is the ``likely cause`` when the alert became active within an hour after it was
    deployed, else ``probably unrelated``; without an activation time it is only named."""
    if not releases:
        return "no release recorded on the affected hosts"
    latest = releases[0]
    if active_since is None or not latest.get("deployed_at"):
        return f"latest release: {latest['version']} on {latest['host']}"
    deployed = datetime.fromisoformat(str(latest["deployed_at"]))
    lead = (active_since - deployed).total_seconds()
    verdict = "likely cause" if 0 <= lead <= 3600 else "probably unrelated"
    return (
        f"release {latest['version']} deployed on {latest['host']} at "
        f"{deployed:%H:%M:%S} UTC, {lead:.0f} s before the alert became active ({verdict})"
    )


def incident_title(rule: str | None, labels: Mapping[str, str], title: str | None = None) -> str:
    """An incident's title: the given one, else ``<rule> firing (<labels>)``, else ``manual
    incident`` (one rule for the evaluator that opens it and the response that runs it)."""
    if title:
        return title
    if not rule:
        return "manual incident"
    text = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{rule} firing" + (f" ({text})" if text else "")
