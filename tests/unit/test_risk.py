"""Risk scoring as a case table: environment, blast radius, time, freeze -> level -> quorum."""

from datetime import UTC, datetime

import pytest

from kmpops.plans.risk import assess_risk, level_for

WED_NOON = datetime(2026, 11, 18, 12, tzinfo=UTC)
SAT_NOON = datetime(2026, 11, 21, 12, tzinfo=UTC)
FRI_LATE = datetime(2026, 11, 20, 16, tzinfo=UTC)


@pytest.mark.parametrize(
    ("envs", "touched", "total", "services", "at", "frozen", "score", "level", "quorum"),
    [
        (["staging"], 1, 4, 1, WED_NOON, False, 1, "low", 0),
        (["development"], 4, 4, 1, WED_NOON, False, 2, "medium", 1),
        (["production"], 1, 4, 1, WED_NOON, False, 2, "medium", 1),
        (["production"], 2, 4, 1, WED_NOON, False, 4, "high", 2),
        (["staging"], 2, 6, 1, SAT_NOON, False, 3, "medium", 1),
        (["staging", "production"], 1, 10, 2, FRI_LATE, False, 4, "high", 2),
        (["staging"], 1, 10, 1, WED_NOON, True, 4, "high", 2),
        (["staging"], 0, 0, 0, WED_NOON, False, 1, "low", 0),
    ],
)
def test_assess_risk(envs, touched, total, services, at, frozen, score, level, quorum):
    risk = assess_risk(
        environments=envs,
        hosts_touched=touched,
        hosts_total=total,
        services=services,
        at=at,
        frozen=frozen,
    )
    assert (risk.score, risk.level, risk.quorum) == (score, level, quorum)
    assert f"**Risk: {level}**" in risk.to_markdown()


@pytest.mark.parametrize(
    ("score", "level"),
    [(0, "low"), (1, "low"), (2, "medium"), (3, "medium"), (4, "high"), (9, "high")],
)
def test_level_for(score, level):
    assert level_for(score) == level


def test_impossible_counts():
    with pytest.raises(ValueError):
        assess_risk(
            environments=["staging"], hosts_touched=5, hosts_total=4, services=1, at=WED_NOON
        )
