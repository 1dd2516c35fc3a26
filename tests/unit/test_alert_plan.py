"""Case tables for kmpops.plans.alerts: threshold/duration parsing and rule evaluation."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kmpops.plans.alerts import parse_duration, parse_threshold


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80%", 0.8),
        ("1%", 0.01),
        ("0.5%", 0.005),
        ("100%", 1.0),
        (" 80 % ", 0.8),
        ("0.8", 0.8),
        ("250", 250.0),
        ("-3", -3.0),
        ("1e3", 1000.0),
        (80, 80.0),
        (0.25, 0.25),
    ],
)
def test_parse_threshold(text, expected):
    assert parse_threshold(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "%", "80 percent", "abc", "nan", "inf", "1e400", "8 0%", True, None, [1]]
)
def test_parse_threshold_rejects(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("5m", timedelta(minutes=5)),
        ("1m", timedelta(minutes=1)),
        ("30s", timedelta(seconds=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
        ("1y", timedelta(days=365)),
        ("1d12h30m15s500ms", timedelta(days=1, hours=12, minutes=30, seconds=15, milliseconds=500)),
        ("90m", timedelta(minutes=90)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "5", "5 m", "m", "1.5h", "30m1h", "5mm", "5x", "-5m", "1h1h", 5, None]
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)
