"""Serve every kmp-ops flow as a deployment, with its schedule or event trigger.

Run from the repository root with ``KMPOPS_CONFIG`` and ``PREFECT_API_URL`` set::

    python -m deployments.serve            # all flows
    python -m deployments.serve --list     # what would be served, with schedules

Backup schedules come from the guide's ``backups:`` block in ops.yaml. A critical alert firing
(event ``kmpops.alert.firing``) starts ``incident-response``; a deploy-pipeline run that turns
Crashed (event ``prefect.flow-run.Crashed``) starts ``deploy-recover`` for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
from dataclasses import dataclass
from typing import Any

from prefect import Flow, serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

import flows
from tasks.alerting import ALERT_EVENT


@dataclass(frozen=True)
class Plan:
    """How one flow is run when served."""

    cron: str | None = None
    interval: float | None = None
    # "alert" (incident-response), "deploy-crashed" (deploy-recover) or
    # "change-request-crashed" (change-request-recover)
    trigger: str | None = None


def schedules(config: Any | None) -> dict[str, Plan]:
    """Flow name → how it runs; backup crons come from ops.yaml's ``backups:`` block."""
    backups = getattr(config, "backups", {}) if config is not None else {}
    db_cron = backups["database"].schedule if "database" in backups else "0 0 * * *"
    cfg_cron = backups["configuration"].schedule if "configuration" in backups else "0 */6 * * *"
    return {
        "backup-database": Plan(cron=db_cron),
        "backup-configuration": Plan(cron=cfg_cron),
        "verify-backups": Plan(cron="30 0 * * *"),
        "backup-retention": Plan(cron="0 2 * * *"),
        "dr-drill": Plan(cron="0 3 * * 0"),
        "evaluate-alerts": Plan(interval=60),
        "incident-response": Plan(trigger="alert"),
        "deploy-recover": Plan(trigger="deploy-crashed"),
        "change-request-recover": Plan(trigger="change-request-crashed"),
        "maintenance-daily": Plan(cron="0 6 * * *"),
        "maintenance-weekly": Plan(cron="0 7 * * 1"),
        "maintenance-monthly": Plan(cron="0 8 1 * *"),
        "compliance-audit": Plan(cron="0 9 1 * *"),
        "capacity-report": Plan(cron="0 7 * * 1"),
        "cost-report": Plan(cron="0 8 1 * *"),
        "access-review": Plan(cron="0 9 1 * *"),
        "rotate-service-keys": Plan(cron="0 5 1 */3 *"),
        "audit-checkpoint": Plan(cron="17 * * * *"),
    }


def discover() -> list[Flow[Any, Any]]:
    """Every Prefect flow defined in the ``flows`` package, by module."""
    found: dict[str, Flow[Any, Any]] = {}
    for mod in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{mod.name}")
        for value in vars(module).values():
            if isinstance(value, Flow) and value.__module__ == module.__name__:
                found[value.name] = value
    return [found[name] for name in sorted(found)]


def alert_trigger() -> DeploymentEventTrigger:
    """Start incident-response when evaluate-alerts (or the Alertmanager receiver) emits."""
    from tasks.alerting import incident_trigger

    return incident_trigger()


def build(config: Any | None, *, schedules_active: bool = True) -> list[Any]:
    """One runner deployment per flow, named after the flow.

    With ``schedules_active=False`` every schedule is created inactive: it shows on the
    deployment's page and a person turns it on there (the demo serves this way); manual runs,
    API runs and event triggers work either way.
    """
    from prefect.schedules import Cron, Interval

    plans = schedules(config)
    deployments = []
    for fl in discover():
        plan = plans.get(fl.name, Plan())
        kwargs: dict[str, Any] = {"name": fl.name, "tags": ["kmp-ops"]}
        if plan.cron:
            kwargs["schedules"] = [Cron(plan.cron, active=schedules_active)]
        if plan.interval:
            kwargs["schedules"] = [Interval(plan.interval, active=schedules_active)]
        if plan.trigger == "alert":
            kwargs["triggers"] = [alert_trigger()]
        elif plan.trigger == "deploy-crashed":
            from tasks.deploy import recover_trigger

            kwargs["triggers"] = [recover_trigger()]
        elif plan.trigger == "change-request-crashed":
            from tasks.deploy import change_request_recover_trigger

            kwargs["triggers"] = [change_request_recover_trigger()]
        deployments.append(fl.to_deployment(**kwargs))
    return deployments


def main(argv: list[str] | None = None) -> None:
    """Serve (or list) the deployments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print what would be served and exit")
    parser.add_argument(
        "--schedules",
        choices=("on", "paused"),
        default="on",
        help="'paused' creates every schedule inactive, to be turned on in the UI (default: on)",
    )
    args = parser.parse_args(argv)
    config = None
    if os.environ.get("KMPOPS_CONFIG"):
        from tasks.common import ops_config

        config = ops_config()
    plans = schedules(config)
    if args.list:
        for fl in discover():
            plan = plans.get(fl.name, Plan())
            how = plan.cron or (f"every {plan.interval:g}s" if plan.interval else None)
            events = {
                "alert": ALERT_EVENT,
                "deploy-crashed": "a crashed deploy-pipeline run",
                "change-request-crashed": "a crashed change-request run",
            }
            how = how or (f"on {events[plan.trigger]}" if plan.trigger else "manual")
            print(f"{fl.name:28s} {how}")
        return
    from deployments.automations import apply_automations

    apply_automations()  # zombie runs -> Crashed (so a killed deploy gets deploy-recover)
    serve(*build(config, schedules_active=args.schedules == "on"))


if __name__ == "__main__":
    main()
