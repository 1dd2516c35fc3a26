"""Alert-rule semantics: thresholds, durations and Prometheus ``for:`` state machines.

Pure code, no I/O. The contract follows ``rules/alerting.go`` of prometheus/prometheus.

Thresholds (:func:`parse_threshold`): a value with ``%`` is a fraction of one, compared
against a ratio 0..1 (``"80%"`` -> ``0.8``, ``"1%"`` -> ``0.01``); a bare number compares
against the raw value (``"0.8"`` -> ``0.8``, ``"250"`` -> ``250.0``). A rule's query must
therefore return a ratio when its threshold is written with ``%``.

Durations (:func:`parse_duration`): the Prometheus duration grammar, units in descending
order, each at most once: ``y`` (365 d), ``w``, ``d``, ``h``, ``m``, ``s``, ``ms``; e.g.
``5m``, ``1h30m``, ``1d12h``, ``0``.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

__all__ = ["parse_duration", "parse_threshold"]

_DURATION_RE = re.compile(
    r"(?:(?P<y>\d+)y)?(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?"
    r"(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?"
)
_UNIT_MS = {
    "y": 365 * 86_400_000,
    "w": 7 * 86_400_000,
    "d": 86_400_000,
    "h": 3_600_000,
    "m": 60_000,
    "s": 1_000,
    "ms": 1,
}
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def parse_duration(text: str | timedelta) -> timedelta:
    """Parse a Prometheus duration (``"5m"``, ``"1h30m"``, ``"0"``) into a timedelta.

    A timedelta is returned unchanged. Raises ValueError naming the text when it is empty,
    uses an unknown unit, repeats a unit or lists units out of order.
    """
    if isinstance(text, timedelta):
        if text < timedelta(0):
            raise ValueError(f"invalid duration {text!r}: negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}: expected a string such as '5m'")
    stripped = text.strip()
    if stripped == "0":
        return timedelta(0)
    match = _DURATION_RE.fullmatch(stripped)
    if not stripped or match is None or not any(match.groupdict().values()):
        raise ValueError(
            f"invalid duration {text!r}: expected e.g. '30s', '5m', '1h30m' "
            "(units y w d h m s ms, largest first)"
        )
    total_ms = sum(int(v) * _UNIT_MS[unit] for unit, v in match.groupdict().items() if v)
    return timedelta(milliseconds=total_ms)


def parse_threshold(text: str | float) -> float:
    """Parse an alert threshold: ``"80%"`` -> ``0.8`` (a ratio), ``"250"`` or ``250`` -> ``250.0``.

    Raises ValueError naming the text for anything else (empty, ``"80 percent"``, NaN,
    infinities, booleans).
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid threshold {text!r}: expected a number or a percentage")
    if isinstance(text, int | float):
        value = float(text)
    elif isinstance(text, str):
        stripped = text.strip()
        percent = stripped.endswith("%")
        number = stripped[:-1].rstrip() if percent else stripped
        if not _NUMBER_RE.fullmatch(number):
            raise ValueError(
                f"invalid threshold {text!r}: expected a number ('0.8', '250') "
                "or a percentage ('80%')"
            )
        value = float(number) / 100.0 if percent else float(number)
    else:
        raise ValueError(f"invalid threshold {text!r}: expected a number or a percentage")
    if not math.isfinite(value):
        raise ValueError(f"invalid threshold {text!r}: must be finite")
    return value
