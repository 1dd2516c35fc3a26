"""evaluate-alerts: the guide's alert rules, evaluated like Prometheus ``for:`` rules.

Each run evaluates every rule of ``ops.yaml`` once (run it on a schedule, e.g. every 15 s, or
with ``rounds``/``interval_s`` to loop inside one run): query → evaluate with the state kept in
the records store (so a restart keeps the ``for:`` clock) → notifications routed by severity,
one per state change, reminders at ``notifications.repeat_interval``, silences honoured. An
alert that starts firing on a rule that opens incidents (critical, or ``incident: true``) emits
``kmpops.alert.firing``; the incident-response deployment's trigger starts the response from
that event (also when this evaluator runs on another machine). ``start_incidents="subflow"``
runs incident-response directly instead (tests, single-process setups).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from kmpops.locks import procedure_target
from tasks.alerting import (
    RuleEvaluation,
    alert_payload,
    alert_rules,
    emit_alert_firing,
    evaluate_rule,
)
from tasks.common import notify, ops_config
from tasks.locks import locked

StartMode = Literal["event", "subflow", "none"]


@flow(name="evaluate-alerts", log_prints=False)
@locked(lambda **_: [procedure_target("evaluate-alerts")])
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

    ``start_incidents``: ``event`` emits ``kmpops.alert.firing``, ``subflow`` also runs
    incident-response in this process (with ``incident_options``), ``none`` only notifies.
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
            for change in result.firing():
                fired = True
                if not result.opens_incident or start_incidents == "none":
                    continue
                payload = alert_payload(change)
                event_id = emit_alert_firing(payload) if start_incidents == "event" else None
                logger.info("alert %s firing: event %s", change.key, event_id or "(subflow)")
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
