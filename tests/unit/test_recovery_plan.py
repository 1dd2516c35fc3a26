"""kmpops.plans.recovery: what a crashed deploy run left to undo, what a restore may touch,
which restore copies have expired."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kmpops.errors import PolicyViolation
from kmpops.plans.recovery import (
    RecoveryPlan,
    expired_previous_copies,
    plan_recovery,
    plan_restore,
    previous_copy_name,
    staging_copy_name,
)

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


# -- plan_restore: who may restore what, where ------------------------------------------------

CONFIGURED = {"app": "app", "billing_db": "billing"}


def restore(**overrides: Any) -> Any:
    facts: dict[str, Any] = {
        "database": "app",
        "dbname": "app",
        "environment": "production",
        "scratch_pattern": "{dbname}_restore_*",
        "configured_dbnames": CONFIGURED,
        "existing": {"app", "billing_db", "postgres", "app_restore_old"},
        "approval_required": True,
        "backup_label": "backup #7",
        "backup_verified": True,
    }
    return plan_restore(**{**facts, **overrides})


@pytest.mark.parametrize(
    ("overrides", "target", "replace", "approval"),
    [
        ({}, "app", True, True),  # over production: approval + safety backup
        ({"requested_environment": "production"}, "app", True, True),  # repeating it is fine
        ({"approval_required": False}, "app", True, True),  # outside development: always
        (  # development, no policy: no approval, still a safety backup
            {"environment": "development", "approval_required": False},
            "app",
            True,
            False,
        ),
        ({"environment": "development"}, "app", True, True),  # its policy asks for one
        ({"existing": {"postgres"}}, "app", False, False),  # nothing to replace
        ({"requested_target": "app_restore_1"}, "app_restore_1", False, False),  # new scratch
        (  # a failed backup, forced: approval even into a new scratch database
            {"requested_target": "app_restore_1", "backup_verified": False, "force": True},
            "app_restore_1",
            False,
            True,
        ),
        ({"backup_verified": None}, "app", True, True),  # not yet verified: chosen by id
    ],
)
def test_restore_plan_cases(
    overrides: dict[str, Any], target: str, replace: bool, approval: bool
) -> None:
    plan = restore(**overrides)
    assert (plan.target, plan.replace, plan.safety_backup, plan.needs_approval) == (
        target,
        replace,
        replace,
        approval,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"requested_environment": "dev"}, r"environment 'dev' does not match .*'production'"),
        ({"requested_environment": "development"}, "does not match"),
        ({"requested_target": "billing_db"}, "configured database billing"),
        ({"requested_target": "postgres"}, "system database"),
        ({"requested_target": "template1"}, "system database"),
        ({"requested_target": "app_copy"}, r"neither 'app' nor a scratch name matching"),
        ({"requested_target": "other_restore_1"}, "scratch name matching 'app_restore_\\*'"),
        ({"requested_target": "app_restore_" + "x" * 60}, "scratch name"),  # over 63 bytes
        ({"requested_target": "app_restore_old"}, "already exists"),
        ({"backup_verified": False}, "failed verification"),
    ],
)
def test_restore_plan_refusals(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyViolation, match=message):
        restore(**overrides)


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("existing", "expired"),
    [
        ([], []),
        (["app__pre_20261201120000"], []),  # one day old, kept for 7
        (["app__pre_20261124115959"], ["app__pre_20261124115959"]),  # just over 7 days
        (["app__restoring_20261101000000"], ["app__restoring_20261101000000"]),  # abandoned
        (["app__pre_20261399000000"], []),  # not a time: never chosen
        (["app_pre_20200101000000", "xapp__pre_20200101000000"], []),  # only look alike
        (["app__pre_20200101000000_x", "app__pre_2020"], []),
        (["billing__pre_20200101000000"], []),  # another database's copy
        (
            ["app", "app__pre_20200101000000", "app__pre_20261202115900"],
            ["app__pre_20200101000000"],
        ),
    ],
)
def test_expired_previous_copies_cases(existing: list[str], expired: list[str]) -> None:
    assert expired_previous_copies("app", existing, now=NOW, keep=timedelta(days=7)) == expired


def test_copy_names_fit_postgres_and_are_found_again() -> None:
    long = "d" * 63
    made = NOW - timedelta(days=30)
    names = [previous_copy_name(long, made), staging_copy_name(long, made)]
    assert all(len(n) <= 63 for n in names)
    assert expired_previous_copies(long, names, now=NOW, keep=timedelta(days=7)) == sorted(names)
