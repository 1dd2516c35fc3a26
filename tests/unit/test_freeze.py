"""Freeze windows as case tables: absolute, weekly, past midnight, emergency override."""

from datetime import UTC, datetime

import pytest

from kmpops.config import FreezeWindow
from kmpops.plans.freeze import check_freeze, in_window

YEAR_END = FreezeWindow(
    name="year-end", start=datetime(2026, 12, 20, tzinfo=UTC), end=datetime(2027, 1, 2, tzinfo=UTC)
)
FRIDAY = FreezeWindow.model_validate(
    {"name": "friday", "days": ["fri"], "from": "16:00", "to": "23:59", "tz": "UTC"}
)
NIGHT = FreezeWindow.model_validate(
    {"name": "night", "days": ["mon"], "from": "22:00", "to": "05:59", "tz": "Europe/Berlin"}
)


def utc(*args):
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "at", "inside"),
    [
        (YEAR_END, utc(2026, 12, 19, 23, 59), False),
        (YEAR_END, utc(2026, 12, 20, 0, 0), True),
        (YEAR_END, utc(2027, 1, 1, 23, 59), True),
        (YEAR_END, utc(2027, 1, 2, 0, 0), False),  # end is exclusive
        (YEAR_END, datetime(2026, 12, 25, 12), True),  # naive = UTC
        (FRIDAY, utc(2026, 11, 20, 15, 59), False),  # 2026-11-20 is a Friday
        (FRIDAY, utc(2026, 11, 20, 16, 0), True),
        (FRIDAY, utc(2026, 11, 20, 23, 59, 59), True),  # "to" minute is inclusive
        (FRIDAY, utc(2026, 11, 21, 0, 0), False),
        (FRIDAY, utc(2026, 11, 19, 17, 0), False),  # Thursday
        (NIGHT, utc(2026, 11, 16, 21, 30), True),  # Monday 22:30 Berlin (UTC+1)
        (NIGHT, utc(2026, 11, 17, 4, 0), True),  # Tuesday 05:00 Berlin, after a listed Monday
        (NIGHT, utc(2026, 11, 17, 5, 0), False),  # Tuesday 06:00 Berlin
        (NIGHT, utc(2026, 11, 16, 4, 0), False),  # Monday morning: Sunday is not listed
    ],
)
def test_in_window(window, at, inside):
    assert in_window(window, at) is inside


@pytest.mark.parametrize(
    ("at", "emergency", "allowed", "frozen", "extra"),
    [
        (utc(2026, 11, 18, 10), False, True, False, 0),
        (utc(2026, 12, 24, 10), False, False, True, 0),
        (utc(2026, 12, 24, 10), True, True, True, 1),
        (utc(2026, 11, 18, 10), True, True, False, 0),  # no window: override costs nothing
    ],
)
def test_check_freeze(at, emergency, allowed, frozen, extra):
    decision = check_freeze([FRIDAY, YEAR_END], at, emergency=emergency)
    assert (decision.allowed, decision.frozen, decision.extra_approvers) == (allowed, frozen, extra)
    if frozen:
        assert decision.window == "year-end" and "year-end" in decision.reason
