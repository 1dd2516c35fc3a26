"""kmpops.plans.recovery: what a crashed deploy run left to undo, from its audit trail."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from kmpops.plans.recovery import RecoveryPlan, plan_recovery

Event = tuple[str, str, Mapping[str, Any]]  # (action, subject, details), as plan_recovery takes

REQ: Event = ("deploy.requested", "web@2.0.0->production", {})


def activating(env: str, previous: Mapping[str, str | None], version: str = "2.0.0") -> Event:
    return ("deploy.activating", f"web/{env}", {"version": version, "previous": previous})


@pytest.mark.parametrize(
    ("events", "hosts", "finished"),
    [
        ([REQ], {}, None),  # died before switching anything
        (
            [REQ, activating("staging", {"stg-1": "1.0.0", "stg-2": None})],
            {("staging", "stg-1"): "1.0.0", ("staging", "stg-2"): None},
            None,
        ),
        (  # staging was rolled back host by host, production's first batch was activating
            [
                REQ,
                activating("staging", {"stg-1": "1.0.0"}),
                ("deploy.switch", "web/staging/stg-1", {"version": "2.0.0"}),
                ("deploy.rollback", "web/staging/stg-1", {"to": "1.0.0"}),
                activating("production", {"prd-1": "1.0.0", "prd-2": "1.0.0"}),
            ],
            {("production", "prd-1"): "1.0.0", ("production", "prd-2"): "1.0.0"},
            None,
        ),
        (  # the run finished on its own: nothing to undo
            [REQ, activating("production", {"prd-1": "1.0.0"}), ("deploy.completed", "x", {})],
            {},
            "deploy.completed",
        ),
        (
            [REQ, activating("production", {"prd-1": "1.0.0"}), ("deploy.rolled_back", "x", {})],
            {},
            "deploy.rolled_back",
        ),
    ],
)
def test_plan_recovery(
    events: list[Event], hosts: dict[tuple[str, str], str | None], finished: str | None
) -> None:
    plan = plan_recovery(events)
    assert plan == RecoveryPlan("web", "2.0.0", finished=finished, hosts=hosts)


def test_a_trail_it_did_not_write_is_refused() -> None:
    with pytest.raises(ValueError, match=r"deploy\.activating 'web'"):
        plan_recovery([("deploy.activating", "web", {"previous": {}})])
