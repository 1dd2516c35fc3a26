"""Server-side automations kmp-ops relies on, created or updated by name (idempotent).

``kmpops-crash-zombie-runs``: a flow run that sent heartbeats (Prefect 3.9 sends one every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` s, 180 by default) and then neither sent another nor ended
within three periods is marked Crashed — its process or machine is gone. For a deploy-pipeline
run that Crashed state is what starts ``deploy-recover`` (see ``deployments/serve.py``), so a
deploy killed with its machine still ends with every host back on its previous release.

    python -m deployments.automations                  # apply (serve.py applies it too)
    python -m deployments.automations --within 50      # crash after 50 s without a heartbeat

``--within`` must stay above the heartbeat period (at least 30 s in Prefect 3.9) with room for
a late heartbeat, or healthy runs are marked Crashed; the default of three periods is safe.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

__all__ = ["ZOMBIE_AUTOMATION", "apply_automations", "main", "zombie_automation"]

ZOMBIE_AUTOMATION = "kmpops-crash-zombie-runs"
ENDED = ("Completed", "Failed", "Cancelled", "Crashed", "Paused", "Suspended")


def zombie_automation(within: timedelta | None = None) -> Any:
    """The automation (not yet created): ``within`` defaults to 3 heartbeat periods."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import get_current_settings

    if within is None:
        within = timedelta(seconds=3 * (get_current_settings().flows.heartbeat_frequency or 180))
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Mark flow runs Crashed when their heartbeats stop (kmp-ops).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ENDED)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within.total_seconds():g}s: marked Crashed (kmp-ops)",
            )
        ],
    )


def apply_automations(within: timedelta | None = None) -> list[str]:
    """Create kmp-ops' automations, or replace them if their definition changed; returns the
    names created or replaced. Raises what the Prefect client raises (server unreachable)."""
    from prefect.client.orchestration import get_client

    wanted = zombie_automation(within)
    changed = []
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(wanted.name)
        same = [a for a in existing if a.trigger == wanted.trigger and a.actions == wanted.actions]
        if same and len(existing) == 1:
            return changed
        for old in existing:
            client.delete_automation(old.id)
        wanted.create()
        changed.append(wanted.name)
    return changed


def main(argv: list[str] | None = None) -> None:
    """Apply the automations; ``--within SECONDS`` overrides the three heartbeat periods."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--within",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds without a heartbeat before a run is Crashed (default: 3 heartbeat periods)",
    )
    args = parser.parse_args(argv)
    if args.within is not None and args.within <= 0:
        parser.error(f"--within must be a positive number of seconds, not {args.within:g}")
    within = timedelta(seconds=args.within) if args.within is not None else None
    print("\n".join(apply_automations(within)) or "up to date")


if __name__ == "__main__":
    main()
