"""evaluate-alerts: the guide's alert rules, evaluated like Prometheus ``for:`` rules.

Each run evaluates every rule of ``ops.yaml`` once (run it on a schedule, e.g. every 15 s, or
with ``rounds``/``interval_s`` to loop inside one run): query → evaluate with the state kept in
the records store (so a restart keeps the ``for:`` clock) → notifications routed by severity,
one per state change, reminders at ``notifications.repeat_interval``, silences honoured.

An alert that starts firing on a rule that opens incidents (critical, or ``incident: true``)
opens its incident here, in every evaluation whoever started it (a schedule, maintenance-daily,
the UI) — exactly once: an alert whose incident is still open only adds a line to it. Then the
response starts: ``start_incidents="event"`` emits ``kmpops.alert.firing`` carrying the incident
id (the incident-response deployment's trigger starts the response from it, also when this
evaluator runs on another machine), ``"subflow"`` runs incident-response here (tests,
single-process setups), ``"none"`` leaves the opened incident to a person.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from kmpops.plans.incident import incident_title
from tasks.alerting import (
    RuleEvaluation,
    alert_payload,
    alert_rules,
    emit_alert_firing,
    evaluate_rule,
)
from tasks.common import notify, ops_config
from tasks.incident import open_incident

StartMode = Literal["event", "subflow", "none"]


@flow(name="evaluate-alerts", log_prints=False)
def evaluate_alerts(
    rules: list[str] | None = None,
    start_incidents: StartMode = "event",
    rounds: int = 1,
    interval_s: float = 15.0,
    at: datetime | None = None,
    incident_options: dict[str, Any] | None = None,
    stop_when_firing: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the alert rules ``rounds`` times, ``interval_s`` apart (``at`` fixes the time of
    a single round, for replays). Returns one summary per rule and round.

    Every firing alert of a rule that opens incidents opens one (``incidents`` in the summary:
    alert key -> incident id), unless its incident is still open. ``start_incidents``: ``event``
    emits ``kmpops.alert.firing``, ``subflow`` runs incident-response in this process (with
    ``incident_options``), ``none`` starts no response.
    ``stop_when_firing`` ends the rounds after the first round in which an alert started firing.
    Raises NotFound for an unknown rule name, ConfigError for a rule without a query.
    """
    logger = get_run_logger()
    names = rules or [r.name for r in alert_rules(ops_config())]
    summaries: list[dict[str, Any]] = []
    for round_no in range(max(1, rounds)):
        if round_no:
            time.sleep(interval_s)
        fired = False
        futures = [evaluate_rule.submit(name, at) for name in names]
        for fut in futures:
            result: RuleEvaluation = fut.result()
            for msg in result.messages:
                notify(msg.severity, msg.title, msg.body, msg.dedup_key)
            opened: dict[str, int] = {}
            for change in result.firing():
                fired = True
                if not result.opens_incident:
                    continue
                payload = alert_payload(change)
                incident_id, created = open_incident(
                    incident_title(change.rule, change.labels),
                    change.severity,
                    change.key,
                    {
                        "rule": change.rule,
                        "labels": change.labels,
                        "value": change.value,
                        "source": payload["source"],
                        "active_since": change.active_since,
                    },
                )
                if not created:
                    logger.info("alert %s attached to open incident #%s", change.key, incident_id)
                    continue
                opened[change.key] = incident_id
                payload["incident_id"] = incident_id
                if start_incidents == "none":
                    logger.warning("incident #%s opened; no response started", incident_id)
                    continue
                event_id = emit_alert_firing(payload) if start_incidents == "event" else None
                logger.info(
                    "alert %s firing: incident #%s, event %s",
                    change.key,
                    incident_id,
                    event_id or "(subflow)",
                )
                if start_incidents == "subflow":
                    from flows.incident_response import IncidentOptions, incident_response

                    incident_response(
                        alert=payload, options=IncidentOptions(**(incident_options or {}))
                    )
            summaries.append(
                {
                    "round": round_no,
                    "rule": result.rule,
                    "at": result.at,
                    "samples": result.samples,
                    "active": result.active,
                    "changes": [f"{c.key}: {c.previous} -> {c.state}" for c in result.changes],
                    "notified": [m.title for m in result.messages],
                    "silenced": result.silenced,
                    "incidents": opened,
                }
            )
        if fired and stop_when_firing:
            break
    create_table_artifact(
        key="evaluate-alerts",
        table=[
            {
                "rule": s["rule"],
                "round": s["round"],
                "active": ", ".join(f"{k}={v}" for k, v in s["active"].items()) or "-",
                "changes": "; ".join(s["changes"]) or "-",
                "notified": len(s["notified"]),
            }
            for s in summaries
        ],
        description="Alert evaluation: active alerts and state changes per rule",
    )
    return summaries
