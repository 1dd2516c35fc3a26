"""incident-response: the guide's six phases, from a firing alert to a postmortem.

1. **detection** — open the incident (an alert already attached to an open incident only adds a
   line to its timeline and ends this run), then escalate: page L1 and wait for an
   acknowledgement (``notifications.ack_timeout``), unacknowledged → L2 → L3;
2. **analysis** — diagnostics over SSH from the affected hosts + recent releases and changes from
   the records store, correlated with the latest deployment (markdown artifact);
3. **containment** — the incident type's actions (:mod:`kmpops.plans.incident`); destructive ones
   need an approval unless the environment policy's ``auto_containment`` lists the severity;
4. **eradication** — the faulty release is marked bad, hosts confirmed on the known-good one;
5. **recovery** — health checks, then the alert's rule is re-evaluated until the alert resolves;
6. **lessons learned** — the postmortem (timeline, actions, approvals, time to detect / contain
   / recover) as a markdown artifact and in the incident record.

Every phase writes the incident timeline and the audit chain. Started by the
``kmpops.alert.firing`` event (deployment trigger), by evaluate-alerts as a subflow, from the UI
or the API (``alert`` may then carry just a title, a severity and hosts).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from kmpops.config import OpsConfig, Policy
from kmpops.plans.incident import (
    ESCALATION_LEVELS,
    ContainmentAction,
    TimelineEntry,
    alert_key,
    eradication_steps,
    hosts_for_alert,
    incident_type_for,
    plan_containment,
    postmortem_metrics,
    render_diagnostics,
    render_postmortem,
)
from tasks.alerting import evaluate_rule
from tasks.approval import request_approval
from tasks.common import actor, audit, notify, ops_config, records
from tasks.deploy import close_connections, rollback_host
from tasks.incident import (
    check_service_health,
    disable_key_everywhere,
    gather_diagnostics,
    host_environment,
    instances_of,
    notify_level,
    open_incident,
    recent_history,
    record_phase,
    rollback_target,
    run_service_command,
    wait_for_ack,
)
from tasks.verify import analyse_recovery


class AlertSignal(BaseModel):
    """What started the incident: the ``kmpops.alert.firing`` payload, or a manual report."""

    model_config = ConfigDict(extra="ignore")

    rule: str | None = Field(default=None, description="alert rule name")
    labels: dict[str, str] = Field(default_factory=dict)
    value: float | None = None
    severity: Literal["critical", "warning", "info"] = "critical"
    status: str = "firing"
    active_since: datetime | None = Field(default=None, description="when the problem started")
    source: str = "manual"
    key: str | None = Field(default=None, description="alert key (dedup)")
    title: str | None = None
    hosts: list[str] = Field(default_factory=list, description="affected hosts (manual runs)")


class IncidentOptions(BaseModel):
    """How the response runs (timeouts default to ops.yaml)."""

    service: str = "web"
    escalate: bool = True
    ack_timeout_s: float | None = Field(default=None, gt=0)
    approval_timeout_s: float | None = Field(default=None, gt=0)
    recovery_timeout_s: float = Field(default=120.0, gt=0)
    recovery_interval_s: float = Field(default=2.0, gt=0)


def _now() -> datetime:
    return datetime.now(UTC)


def _affected_hosts(cfg: OpsConfig, signal: AlertSignal, service: str) -> list[str]:
    if signal.hosts:
        return list(signal.hosts)
    deployed: list[str] = []
    for env_name, env in cfg.environments.items():
        for host in env.hosts:
            if records().current_release(service, env_name, host.name) is not None:
                deployed.append(host.name)
    return hosts_for_alert(signal.labels, instances_of(cfg, service), deployed)


def _escalate(incident_id: int, title: str, summary: str, timeout_s: float) -> dict[str, Any]:
    for level in ESCALATION_LEVELS:
        sent = notify_level(incident_id, level, title, summary)
        record_phase(incident_id, "detection", f"escalated to {level}", {"deliveries": sent})
        ack = wait_for_ack(incident_id, level, timeout_s, summary)
        if ack is not None:
            record_phase(
                incident_id,
                "detection",
                f"acknowledged at {level} by {ack.responder}",
                {"level": level, "responder": ack.responder, "note": ack.note},
            )
            return {"level": level, "responder": ack.responder}
        record_phase(
            incident_id, "detection", f"no acknowledgement at {level} within {timeout_s:g} s"
        )
    record_phase(incident_id, "detection", "unacknowledged after L3")
    return {"level": None, "responder": None}


def _analysis(
    incident_id: int, service: str, hosts: list[str], signal: AlertSignal
) -> dict[str, Any]:
    record_phase(incident_id, "analysis", f"gathering diagnostics from {len(hosts)} host(s)")
    futures = {h: gather_diagnostics.submit(service, h) for h in hosts}
    diagnostics: dict[str, dict[str, str]] = {}
    for host, fut in futures.items():
        try:
            diagnostics[host] = fut.result()
        except Exception as exc:  # an unreachable host is a finding, not the end of the response
            diagnostics[host] = {"error": f"{type(exc).__name__}: {exc}"}
    releases, changes = recent_history(service, hosts)
    correlation = "no release recorded on the affected hosts"
    if releases:
        latest = releases[0]
        deployed = datetime.fromisoformat(latest["deployed_at"])
        if signal.active_since is not None:
            lead = (signal.active_since - deployed).total_seconds()
            verdict = "likely cause" if 0 <= lead <= 3600 else "probably unrelated"
            correlation = (
                f"release {latest['version']} deployed on {latest['host']} at "
                f"{deployed:%H:%M:%S} UTC, {lead:.0f} s before the alert became active ({verdict})"
            )
        else:
            correlation = f"latest release: {latest['version']} on {latest['host']}"
    markdown = render_diagnostics(
        diagnostics, releases=releases, changes=changes, correlation=correlation
    )
    create_markdown_artifact(
        key=f"incident-{incident_id}-diagnostics",
        markdown=markdown,
        description=f"Incident #{incident_id}: diagnostics",
    )
    record_phase(
        incident_id,
        "analysis",
        f"diagnostics gathered from {', '.join(sorted(diagnostics)) or 'no hosts'}; {correlation}",
        {
            "hosts": sorted(diagnostics),
            "errors": [h for h, d in diagnostics.items() if "error" in d],
        },
    )
    return {"diagnostics": diagnostics, "correlation": correlation, "markdown": markdown}


def _policy(cfg: OpsConfig, hosts: list[str]) -> Policy:
    for host in hosts:
        env, _ = host_environment(cfg, host)
        return cfg.environment(env).policy
    env = cfg.environments.get("production")
    return env.policy if env is not None else Policy()


def _containment(
    incident_id: int,
    incident_type: str,
    signal: AlertSignal,
    hosts: list[str],
    options: IncidentOptions,
) -> dict[str, Any]:
    cfg = ops_config()
    policy = _policy(cfg, hosts)
    by_kind: dict[str, list[str]] = {}
    fingerprint = signal.labels.get("fingerprint")
    address = signal.labels.get("address") or signal.labels.get("source_ip")
    if fingerprint:
        by_kind["disable_key"] = [fingerprint]
    if address:
        by_kind["block_address"] = [address]
    plan = plan_containment(
        incident_type,
        severity=signal.severity,
        targets=hosts,
        auto_containment=policy.auto_containment,
        targets_by_kind=by_kind,
    )
    record_phase(
        incident_id,
        "containment",
        f"plan: {len(plan.actions)} action(s); approval {plan.reason}",
        {"actions": [f"{a.kind}:{a.target}" for a in plan.actions]},
    )
    actions: list[str] = []
    rolled_back: dict[str, dict[str, str | None]] = {}
    drained: list[str] = []
    if plan.needs_approval:
        outcome = request_approval(
            subject=f"incident/{incident_id}/containment",
            summary_markdown=f"Incident #{incident_id}: {signal.title or signal.rule}\n\n"
            + plan.markdown(),
            policy=policy,
            requested_by=actor(),
            timeout_s=options.approval_timeout_s,
        )
        record_phase(incident_id, "containment", f"approval {outcome.summary()}")
        if not outcome.approved:
            return {
                "contained": False,
                "actions": actions,
                "rolled_back": rolled_back,
                "drained": drained,
            }
    ok = True
    for action in plan.actions:
        if action.kind == "rollback_release":
            env, current, target = rollback_target(options.service, action.target)
            if target is None or current is None:
                record_phase(
                    incident_id,
                    "containment",
                    f"{action.target}: nothing to roll back to (current {current})",
                )
                ok = False
                continue
            line = rollback_host(options.service, env, action.target, target, current)
            rolled_back[action.target] = {"from": current, "to": target, "environment": env}
            actions.append(f"rolled back {action.target}: {current} -> {target}")
            record_phase(
                incident_id, "containment", f"rolled back {line}", rolled_back[action.target]
            )
        else:
            done = _contain_other(incident_id, action, fingerprint, address, hosts, options)
            if done is None:
                actions.append(f"manual: {action.description} ({action.target})")
                ok = False
            else:
                actions.append(done)
                if action.kind == "drain_host":
                    drained.append(action.target)
    close_connections()
    contained = ok and bool(plan.actions)
    if contained:
        records().update_incident(incident_id, contained_at=_now(), state="contained")
        record_phase(incident_id, "containment", "contained")
    return {
        "contained": contained,
        "actions": actions,
        "rolled_back": rolled_back,
        "drained": drained,
    }


def _contain_other(
    incident_id: int,
    action: ContainmentAction,
    fingerprint: str | None,
    address: str | None,
    hosts: list[str],
    options: IncidentOptions,
) -> str | None:
    """Carry out a drain / disable-key / block-address action; the line for the postmortem,
    or None when it stays a manual item (not configured, no target in the alert, or failed:
    the reason is on the timeline)."""
    try:
        if action.kind == "drain_host":
            run_service_command(options.service, action.target, "drain")
            line = f"drained {action.target} (out of rotation)"
        elif action.kind == "disable_key" and fingerprint:
            from kmpops.access import fingerprint_of_key_file

            key_files = {h.key_file for e in ops_config().environments.values() for h in e.hosts}
            own = sorted(fingerprint_of_key_file(k) for k in key_files)  # never disabled
            removed = disable_key_everywhere(fingerprint, own)
            line = f"disabled key {fingerprint} on {', '.join(removed) or 'no host (not found)'}"
        elif action.kind == "block_address" and address:
            for host in hosts:
                run_service_command(options.service, host, "block_address", address)
            line = f"blocked {address} on {', '.join(hosts)}"
        else:
            record_phase(
                incident_id,
                "containment",
                f"manual action required: {action.kind} (no target in the alert's labels)",
            )
            return None
    except Exception as exc:
        record_phase(
            incident_id,
            "containment",
            f"manual action required: {action.kind} on {action.target}: {exc}",
        )
        return None
    record_phase(incident_id, "containment", line)
    return line


def _eradication(
    incident_id: int, incident_type: str, service: str, rolled_back: dict[str, Any]
) -> list[str]:
    done: list[str] = []
    for host, change in rolled_back.items():
        audit(
            "release.marked_bad",
            f"{service}/{change['environment']}/{host}",
            version=change["from"],
            incident=incident_id,
        )
        _, current, _ = rollback_target(service, host)
        verdict = "confirmed" if current == change["to"] else f"NOT confirmed (runs {current})"
        done.append(
            f"{host}: release {change['from']} marked bad; known-good {change['to']} {verdict}"
        )
    steps = eradication_steps(incident_type)
    items = done or [f"to do: {s}" for s in steps]
    for line in items:
        record_phase(incident_id, "eradication", line)
    return items


def _recovery_analysis(incident_id: int, service: str, hosts: list[str]) -> bool:
    """The service's configured analysis of the recovered hosts (kmpops/plans/analysis.py),
    each verdict an incident phase. False when it failed or was inconclusive: the incident is
    then not recovered but needs attention — the person's decision the ``inconclusive`` policy
    asks for, taken on the incident rather than by pausing a response that has paged people."""
    from kmpops.plans.analysis import verification_action

    ok = True
    for env, report in analyse_recovery(service, hosts):
        action = verification_action(
            report.outcome, ops_config().environment(env).policy.inconclusive
        )
        line = report.describe()[:480]
        if action == "pause":
            line += " — a person decides (the incident needs attention)"
        record_phase(incident_id, "recovery", line)
        ok = ok and action == "proceed"
    return ok


def _recovery(
    incident_id: int,
    signal: AlertSignal,
    key: str | None,
    hosts: list[str],
    options: IncidentOptions,
    drained: list[str] | None = None,
) -> dict[str, Any]:
    cfg = ops_config()
    for host in drained or []:  # back into rotation before the health checks
        try:
            run_service_command(options.service, host, "undrain")
            record_phase(incident_id, "recovery", f"{host} back in rotation")
        except Exception as exc:
            record_phase(incident_id, "recovery", f"{host} could not be undrained: {exc}")
    healthy = True
    for host in hosts:
        ok, detail = check_service_health(options.service, host)
        healthy = healthy and ok
        record_phase(
            incident_id, "recovery", f"{host} health: {'ok' if ok else 'FAILED'} ({detail})"
        )
    healthy = _recovery_analysis(incident_id, options.service, hosts) and healthy
    resolved: bool | None = None
    last_value: float | None = None
    if signal.rule and signal.rule in cfg.alerts and key:
        resolved = False
        deadline = time.monotonic() + options.recovery_timeout_s
        while True:
            result = evaluate_rule(signal.rule)
            for msg in result.messages:
                notify(msg.severity, msg.title, msg.body, msg.dedup_key)
            for change in result.changes:
                if change.key == key:
                    last_value = change.value
            if result.active.get(key) not in ("pending", "firing"):
                resolved = True
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(options.recovery_interval_s)
        record_phase(
            incident_id,
            "recovery",
            f"alert {key} " + ("resolved" if resolved else "still active at the recovery timeout"),
            {"value": last_value},
        )
    else:
        record_phase(
            incident_id, "recovery", "alert resolution not verified (rule not in ops.yaml)"
        )
    recovered = healthy and resolved is not False
    if recovered:
        records().update_incident(incident_id, recovered_at=_now(), state="recovered")
        record_phase(incident_id, "recovery", "recovered")
    return {"healthy": healthy, "resolved": resolved, "recovered": recovered, "value": last_value}


def _lessons_learned(
    incident_id: int,
    incident_type: str,
    signal: AlertSignal,
    actions: list[str],
    recovery: dict[str, Any],
) -> dict[str, Any]:
    rec = records()
    record_phase(incident_id, "lessons_learned", "postmortem drafted")
    inc, events = rec.incident(incident_id)
    metrics = postmortem_metrics(
        started_at=signal.active_since or inc.detected_at,
        detected_at=inc.detected_at,
        contained_at=inc.contained_at,
        recovered_at=inc.recovered_at,
    )
    approvals = [
        {"subject": a.subject, "outcome": a.outcome, "approver": a.approver, "reason": a.reason}
        for a in rec.approvals(subject=f"incident/{incident_id}/containment")
    ]
    before_after = {
        "alert value at detection": signal.value,
        "alert value at recovery": recovery.get("value"),
    }
    items = ["root-cause analysis of the faulty change"]
    if not recovery["recovered"]:
        items.append("incident not recovered automatically: follow up")
    markdown = render_postmortem(
        incident_id=incident_id,
        title=inc.title,
        severity=inc.severity,
        incident_type=incident_type,
        timeline=[TimelineEntry(e.ts, e.phase, e.message, e.details) for e in events],
        metrics=metrics,
        approvals=approvals,
        actions=actions,
        before_after=before_after,
        action_items=items,
    )
    create_markdown_artifact(
        key=f"incident-{incident_id}-postmortem",
        markdown=markdown,
        description=f"Incident #{incident_id}: postmortem draft",
    )

    def secs(d: Any) -> float | None:
        return None if d is None else round(d.total_seconds(), 3)

    numbers = {
        "time_to_detect_s": secs(metrics.time_to_detect),
        "time_to_contain_s": secs(metrics.time_to_contain),
        "time_to_recover_s": secs(metrics.time_to_recover),
    }
    rec.update_incident(
        incident_id,
        state="closed" if recovery["recovered"] else "needs_attention",
        closed_at=_now() if recovery["recovered"] else None,
        details={**(inc.details or {}), "postmortem": markdown, "metrics": numbers},
    )
    audit("incident.postmortem", f"incident/{incident_id}", **numbers)
    return {"markdown": markdown, **numbers}


@flow(name="incident-response")
def incident_response(
    alert: AlertSignal | None = None, options: IncidentOptions | None = None
) -> dict[str, Any]:
    """Run the six phases for ``alert`` (a firing alert's payload or a manual report).

    Returns a summary: incident id, ``duplicate`` (the alert was attached to an open incident
    and nothing else ran), who acknowledged at which level, whether containment and recovery
    succeeded, the postmortem numbers. A refused containment approval is recorded and the
    response continues to the postmortem (state ``needs_attention``).
    """
    logger = get_run_logger()
    signal = alert or AlertSignal()
    opts = options or IncidentOptions()
    cfg = ops_config()
    key = signal.key or (alert_key(signal.rule, signal.labels) if signal.rule else None)
    labels = ", ".join(f"{k}={v}" for k, v in sorted(signal.labels.items()))
    title = signal.title or (
        f"{signal.rule} firing" + (f" ({labels})" if labels else "")
        if signal.rule
        else "manual incident"
    )
    incident_type = incident_type_for(signal.rule, signal.labels)
    hosts = _affected_hosts(cfg, signal, opts.service)

    # 1. detection
    incident_id, created = open_incident(
        title,
        signal.severity,
        key,
        {
            "rule": signal.rule,
            "labels": signal.labels,
            "value": signal.value,
            "source": signal.source,
            "active_since": signal.active_since,
            "type": incident_type,
            "hosts": hosts,
        },
    )
    if not created:
        logger.info("alert %s attached to open incident #%s", key, incident_id)
        return {"incident_id": incident_id, "duplicate": True}
    value = "n/a" if signal.value is None else f"{signal.value:.4g}"
    summary = (
        f"{title}\n\nseverity: {signal.severity}; type: {incident_type}; value: {value}; "
        f"hosts: {', '.join(hosts) or 'unknown'}; source: {signal.source}"
    )
    record_phase(
        incident_id, "detection", f"detected from {signal.source}: {title} (value {value})"
    )
    escalation: dict[str, Any] = {"level": None, "responder": None}
    if opts.escalate:
        timeout = opts.ack_timeout_s or cfg.notifications.ack_timeout.total_seconds()
        escalation = _escalate(incident_id, title, summary, timeout)

    # 2. analysis
    analysis = _analysis(incident_id, opts.service, hosts, signal)
    # 3. containment
    containment = _containment(incident_id, incident_type, signal, hosts, opts)
    # 4. eradication
    eradication = _eradication(incident_id, incident_type, opts.service, containment["rolled_back"])
    # 5. recovery
    recovery = _recovery(incident_id, signal, key, hosts, opts, containment["drained"])
    # 6. lessons learned
    post = _lessons_learned(
        incident_id, incident_type, signal, containment["actions"] + eradication, recovery
    )
    return {
        "incident_id": incident_id,
        "duplicate": False,
        "type": incident_type,
        "hosts": hosts,
        "acknowledged_level": escalation["level"],
        "acknowledged_by": escalation["responder"],
        "correlation": analysis["correlation"],
        "contained": containment["contained"],
        "rolled_back": containment["rolled_back"],
        "recovered": recovery["recovered"],
        "resolved": recovery["resolved"],
        "time_to_detect_s": post["time_to_detect_s"],
        "time_to_contain_s": post["time_to_contain_s"],
        "time_to_recover_s": post["time_to_recover_s"],
    }
