"""incident-response: the guide's six phases, from a firing alert to a postmortem — contain first.

1. **detection** — open the incident (or take over the one the alert evaluation opened; an
   alert already attached to an open incident only adds a line to its timeline and ends this
   run), then start the escalation *alongside* everything else: the ``incident-escalation``
   subflow pages L1 and waits for an acknowledgement (``notifications.ack_timeout``),
   unacknowledged → L2 → L3, while the response goes on;
2. **analysis** — diagnostics over SSH from the affected hosts (started at once, in parallel)
   + recent releases and changes from the records store, correlated with the latest deployment
   (markdown artifact);
3. **containment** — the incident type's actions (:mod:`kmpops.plans.incident`), on targets from
   the inventory only: an alert's labels may narrow the hosts, and the addresses and keys they
   name are checked against ``incidents`` in ops.yaml. Where the environment policy's
   ``auto_containment`` lists the severity and no label chose a target, containment starts
   right after detection, without waiting for the analysis or an acknowledgement; otherwise it
   waits for the analysis and an approval;
4. **eradication** — the faulty release is marked bad, hosts confirmed on the known-good one;
5. **recovery** — health checks, then the alert's rule is re-evaluated until the alert resolves;
6. **lessons learned** — once the escalation has ended, the postmortem (timeline, actions,
   approvals, time to detect / contain / recover) as a markdown artifact and in the record.

Every phase writes the incident timeline and the audit chain. Started by the
``kmpops.alert.firing`` event (deployment trigger), by evaluate-alerts as a subflow, from the UI
or the API (``alert`` may then carry just a title, a severity and hosts).
"""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from kmpops.config import OpsConfig, Policy
from kmpops.plans.approval import service_identity
from kmpops.plans.incident import (
    ESCALATION_LEVELS,
    ContainmentAction,
    ContainmentPlan,
    IncidentScope,
    TimelineEntry,
    alert_key,
    classify_incident,
    containment_plan_for,
    correlate_release,
    eradication_steps,
    incident_scope,
    incident_title,
    postmortem_metrics,
    render_diagnostics,
    render_postmortem,
)
from tasks.alerting import evaluate_rule
from tasks.approval import request_approval, requester_for_run
from tasks.artifacts import create_markdown_artifact
from tasks.audit import anchor_after_change
from tasks.common import audit, notify, ops_config, records
from tasks.context import in_run_context, run_context
from tasks.deploy import rollback_host
from tasks.incident import (
    PAUSE_GRACE_S,
    check_service_health,
    claim_incident,
    containment_facts,
    disable_key_everywhere,
    gather_diagnostics,
    instances_of,
    inventory,
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
    hosts: list[str] = Field(
        default_factory=list, description="affected hosts (manual runs; narrows, never widens)"
    )
    incident_id: int | None = Field(
        default=None, description="the incident the alert evaluation opened for this alert"
    )


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


def _scope(cfg: OpsConfig, signal: AlertSignal, service: str) -> IncidentScope:
    deployed: list[str] = []
    for env_name, env in cfg.environments.items():
        for host in env.hosts:
            if records().current_release(service, env_name, host.name) is not None:
                deployed.append(host.name)
    return incident_scope(
        signal.labels,
        inventory=inventory(cfg),
        requested_hosts=signal.hosts,
        instances=instances_of(cfg, service),
        deployed=deployed,
    )


@flow(name="incident-escalation")
def incident_escalation(
    incident_id: int,
    title: str,
    summary: str,
    timeout_s: float,
    l1_paged_at: float | None = None,
) -> dict[str, Any]:
    """Page L1 → L2 → L3, each waiting ``timeout_s`` for an acknowledgement (a pause of this
    run, answered in the UI or by ``resume_flow_run``). Runs beside incident-response, so the
    response never waits for it. ``l1_paged_at`` (epoch seconds): L1 was already paged then by
    the response, at detection; its wait counts from that moment. Returns the level and
    responder that acknowledged (both None when nobody did)."""
    for level in ESCALATION_LEVELS:
        wait_s = timeout_s
        if level == ESCALATION_LEVELS[0] and l1_paged_at is not None:
            wait_s = max(0.0, timeout_s - (time.time() - l1_paged_at))
        else:
            sent = notify_level(incident_id, level, title, summary)
            record_phase(incident_id, "detection", f"escalated to {level}", {"deliveries": sent})
        ack = wait_for_ack(incident_id, level, wait_s, summary)
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


class _Escalation:
    """Paging beside the response: L1 is paged at once (from the response), then the
    ``incident-escalation`` flow runs in a thread of its own and waits for acknowledgements
    while analysis and containment go on.

    It is a flow run of its own, not a subflow: a subflow's pause and its parent's pause (a
    containment approval) block each other in Prefect 3, an independent run does not."""

    def __init__(self, incident_id: int, title: str, summary: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._result: Future[dict[str, Any]] = Future()
        first = ESCALATION_LEVELS[0]
        sent = notify_level(incident_id, first, title, summary)
        paged_at = time.time()
        record_phase(incident_id, "detection", f"escalated to {first}", {"deliveries": sent})
        self._thread = threading.Thread(
            target=contextvars.Context().run,  # a fresh context: not a subflow of this run
            args=(self._run, incident_id, title, summary, timeout_s, paged_at),
            name=f"incident-{incident_id}-escalation",
            daemon=True,
        )
        self._thread.start()

    def _run(
        self, incident_id: int, title: str, summary: str, timeout_s: float, paged_at: float
    ) -> None:
        try:
            self._result.set_result(
                incident_escalation(incident_id, title, summary, timeout_s, paged_at)
            )
        except BaseException as exc:  # handed to the flow by result()
            self._result.set_exception(exc)

    def result(self) -> dict[str, Any]:
        """Wait for the escalation to end (bounded: three levels and their grace periods)."""
        bound = len(ESCALATION_LEVELS) * (self.timeout_s + PAUSE_GRACE_S) + 120
        try:
            return self._result.result(timeout=bound)
        except Exception as exc:  # a broken page is recorded, it does not undo the response
            get_run_logger().error("escalation failed: %s: %s", type(exc).__name__, exc)
            return {"level": None, "responder": None, "error": f"{type(exc).__name__}: {exc}"}


def _start_analysis(incident_id: int, service: str, hosts: list[str]) -> dict[str, Any]:
    record_phase(incident_id, "analysis", f"gathering diagnostics from {len(hosts)} host(s)")
    return {h: gather_diagnostics.submit(service, h) for h in hosts}


def _finish_analysis(
    incident_id: int, service: str, hosts: list[str], signal: AlertSignal, futures: dict[str, Any]
) -> dict[str, Any]:
    diagnostics: dict[str, dict[str, str]] = {}
    for host, fut in futures.items():
        try:
            diagnostics[host] = fut.result()
        except Exception as exc:  # an unreachable host is a finding, not the end of the response
            diagnostics[host] = {"error": f"{type(exc).__name__}: {exc}"}
    releases, changes = recent_history(service, hosts)
    correlation = correlate_release(releases, signal.active_since)
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


def _plan(
    cfg: OpsConfig, signal: AlertSignal, scope: IncidentScope
) -> tuple[ContainmentPlan, Policy]:
    policy = cfg.environment(scope.environment).policy if scope.environment else Policy()
    facts = containment_facts(cfg)
    plan = containment_plan_for(
        signal.rule,
        signal.labels,
        severity=signal.severity,
        scope=scope,
        auto_containment=policy.auto_containment,
        widest_v4=cfg.incidents.widest_block_v4,
        widest_v6=cfg.incidents.widest_block_v6,
        protected=facts.protected,
        known_keys=facts.known_keys,
        own_keys=facts.own_keys,
    )
    return plan, policy


def _record_plan(incident_id: int, plan: ContainmentPlan) -> None:
    record_phase(
        incident_id,
        "containment",
        f"plan: {len(plan.actions)} action(s); approval {plan.reason}",
        {"actions": [f"{a.kind}:{a.target}" for a in plan.actions]},
    )
    for refusal in plan.refused:
        record_phase(
            incident_id,
            "containment",
            refusal.line(),
            {"kind": refusal.kind, "target": refusal.target, "reason": refusal.reason},
        )


def _approve(
    incident_id: int,
    signal: AlertSignal,
    plan: ContainmentPlan,
    policy: Policy,
    options: IncidentOptions,
    correlation: str,
) -> bool:
    outcome = request_approval(
        subject=f"incident/{incident_id}/containment",
        summary_markdown=f"Incident #{incident_id}: {signal.title or signal.rule}\n\n"
        + (f"Analysis: {correlation}\n\n" if correlation else "")
        + plan.markdown(),
        policy=policy,
        requested_by=requester_for_run("") or service_identity("incident-response"),
        timeout_s=options.approval_timeout_s,
    )
    record_phase(incident_id, "containment", f"approval {outcome.summary()}")
    return outcome.approved


def _contain(incident_id: int, plan: ContainmentPlan, options: IncidentOptions) -> dict[str, Any]:
    """Carry out an approved (or automatic) plan; what was done, for the later phases."""
    actions: list[str] = []
    rolled_back: dict[str, dict[str, str | None]] = {}
    drained: list[str] = []
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
            ctx = run_context()
            line = rollback_host(
                ctx.service(options.service), env, ctx.host(action.target, env), target, current
            )
            rolled_back[action.target] = {"from": current, "to": target, "environment": env}
            actions.append(f"rolled back {action.target}: {current} -> {target}")
            record_phase(
                incident_id, "containment", f"rolled back {line}", rolled_back[action.target]
            )
        else:
            done = _contain_other(incident_id, action, options)
            if done is None:
                actions.append(f"manual: {action.description} ({action.target})")
                ok = False
            else:
                actions.append(done)
                if action.kind == "drain_host":
                    drained.append(action.target)
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
    incident_id: int, action: ContainmentAction, options: IncidentOptions
) -> str | None:
    """Carry out a drain / disable-key / block-address action; the line for the postmortem,
    or None when it stays a manual item (not configured, or failed: the reason is on the
    timeline)."""
    try:
        if action.kind == "drain_host":
            run_service_command(options.service, action.target, "drain")
            line = f"drained {action.target} (out of rotation)"
        elif action.kind == "disable_key":
            own = sorted(containment_facts(ops_config()).own_keys)  # never disabled
            removed = disable_key_everywhere(action.target, own, list(action.hosts))
            line = f"disabled key {action.target} on {', '.join(removed) or 'no host (not found)'}"
        elif action.kind == "block_address":
            for host in action.hosts:
                run_service_command(options.service, host, "block_address", action.target)
            line = f"blocked {action.target} on {', '.join(action.hosts)}"
        else:
            record_phase(incident_id, "containment", f"manual action required: {action.kind}")
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
@in_run_context
def incident_response(
    alert: AlertSignal | None = None, options: IncidentOptions | None = None
) -> dict[str, Any]:
    """Run the six phases for ``alert`` (a firing alert's payload or a manual report).

    Returns a summary: incident id, ``duplicate`` (the alert was attached to an open incident,
    or its incident is already being handled, and nothing else ran), who acknowledged at which
    level, whether containment and recovery succeeded, the postmortem numbers. A refused
    containment approval or a refused target is recorded and the response continues to the
    postmortem (state ``needs_attention``).
    """
    logger = get_run_logger()
    signal = alert or AlertSignal()
    opts = options or IncidentOptions()
    cfg = ops_config()
    key = signal.key or (alert_key(signal.rule, signal.labels) if signal.rule else None)
    title = incident_title(signal.rule, signal.labels, signal.title)
    incident_type, _ = classify_incident(signal.rule, signal.labels)
    scope = _scope(cfg, signal, opts.service)
    hosts = list(scope.hosts)

    # 1. detection
    if signal.incident_id is not None:
        incident_id = signal.incident_id
        if not claim_incident(incident_id, key):
            logger.info("incident #%s is already being handled", incident_id)
            return {"incident_id": incident_id, "duplicate": True}
        records().update_incident(
            incident_id,
            details={
                **(records().incident(incident_id)[0].details or {}),
                "type": incident_type,
                "hosts": hosts,
                "environment": scope.environment,
            },
        )
    else:
        incident_id, _ = open_incident(
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
                "environment": scope.environment,
            },
        )
        # an open incident nobody handles yet (opened by an evaluation) is taken over here
        if not claim_incident(incident_id, key):
            logger.info("alert %s attached to open incident #%s", key, incident_id)
            return {"incident_id": incident_id, "duplicate": True}
    value = "n/a" if signal.value is None else f"{signal.value:.4g}"
    summary = (
        f"{title}\n\nseverity: {signal.severity}; type: {incident_type}; value: {value}; "
        f"environment: {scope.environment or 'unknown'}; hosts: {', '.join(hosts) or 'none'}; "
        f"source: {signal.source}"
    )
    record_phase(
        incident_id, "detection", f"detected from {signal.source}: {title} (value {value})"
    )
    escalation: _Escalation | None = None
    if opts.escalate:
        timeout = opts.ack_timeout_s or cfg.notifications.ack_timeout.total_seconds()
        escalation = _Escalation(incident_id, title, summary, timeout)

    # 2. analysis starts (in parallel); 3. containment does not wait for it when automatic
    diagnostics = _start_analysis(incident_id, opts.service, hosts)
    plan, policy = _plan(cfg, signal, scope)
    _record_plan(incident_id, plan)
    if plan.needs_approval:
        analysis = _finish_analysis(incident_id, opts.service, hosts, signal, diagnostics)
        approved = _approve(incident_id, signal, plan, policy, opts, analysis["correlation"])
        containment = (
            _contain(incident_id, plan, opts)
            if approved
            else {"contained": False, "actions": [], "rolled_back": {}, "drained": []}
        )
    else:
        containment = _contain(incident_id, plan, opts)
        analysis = _finish_analysis(incident_id, opts.service, hosts, signal, diagnostics)
    if containment["actions"]:  # hosts were changed: anchor the evidence before going on
        anchor_after_change(f"incident {incident_id} containment")
    # 4. eradication
    eradication = _eradication(incident_id, incident_type, opts.service, containment["rolled_back"])
    # 5. recovery
    recovery = _recovery(incident_id, signal, key, hosts, opts, containment["drained"])
    acknowledged = escalation.result() if escalation else {"level": None, "responder": None}
    # 6. lessons learned
    post = _lessons_learned(
        incident_id, incident_type, signal, containment["actions"] + eradication, recovery
    )
    return {
        "incident_id": incident_id,
        "duplicate": False,
        "type": incident_type,
        "environment": scope.environment,
        "hosts": hosts,
        "refused": [r.line() for r in plan.refused],
        "acknowledged_level": acknowledged["level"],
        "acknowledged_by": acknowledged["responder"],
        "correlation": analysis["correlation"],
        "contained": containment["contained"],
        "rolled_back": containment["rolled_back"],
        "recovered": recovery["recovered"],
        "resolved": recovery["resolved"],
        "time_to_detect_s": post["time_to_detect_s"],
        "time_to_contain_s": post["time_to_contain_s"],
        "time_to_recover_s": post["time_to_recover_s"],
    }
