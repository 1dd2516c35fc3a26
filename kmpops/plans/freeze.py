"""Freeze windows: is a change at a given moment inside one, and what an override costs.

Pure code, no I/O. Two shapes of window (``kmpops.config.FreezeWindow``):

- absolute: ``start <= at < end`` (timezone-aware datetimes; naive ones are taken as UTC);
- weekly: on the listed ``days`` in ``tz``, from ``from`` up to and including the minute ``to``
  (``16:00``-``23:59`` covers 16:00:00 to 23:59:59). A window with ``to`` before ``from`` runs
  past midnight: it starts on a listed day and ends the next morning.

A change inside a window is refused unless it carries an emergency override; an override is
allowed but needs one more approver than the policy would otherwise ask for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from kmpops.config import FreezeWindow

__all__ = ["FreezeDecision", "active_window", "check_freeze", "in_window"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


def in_window(window: FreezeWindow, at: datetime) -> bool:
    """True if ``at`` falls inside ``window`` (absolute or weekly)."""
    at = _aware(at)
    if window.start is not None and window.end is not None:
        return _aware(window.start) <= at < _aware(window.end)
    assert window.from_ is not None and window.to is not None
    local = at.astimezone(ZoneInfo(window.tz))
    start, end = _minutes(window.from_), _minutes(window.to) + 1  # "to" is an inclusive minute
    now = local.hour * 60 + local.minute
    today = _DAYS[local.weekday()]
    yesterday = _DAYS[(local - timedelta(days=1)).weekday()]
    if start < end:
        return today in window.days and start <= now < end
    # Runs past midnight: the evening part belongs to a listed day, the morning to the day after.
    return (today in window.days and now >= start) or (yesterday in window.days and now < end)


def active_window(windows: Iterable[FreezeWindow], at: datetime) -> FreezeWindow | None:
    """The first window containing ``at``, or None."""
    return next((w for w in windows if in_window(w, at)), None)


@dataclass(frozen=True)
class FreezeDecision:
    """Whether a change may go ahead with respect to freeze windows."""

    frozen: bool
    allowed: bool
    window: str | None = None
    extra_approvers: int = 0
    reason: str = ""


def check_freeze(
    windows: Iterable[FreezeWindow], at: datetime, *, emergency: bool = False
) -> FreezeDecision:
    """Decide a change at ``at``: outside any window -> allowed; inside -> refused, unless
    ``emergency`` (allowed, one extra approver)."""
    window = active_window(windows, at)
    if window is None:
        return FreezeDecision(frozen=False, allowed=True, reason="no freeze window is active")
    if emergency:
        return FreezeDecision(
            frozen=True,
            allowed=True,
            window=window.name,
            extra_approvers=1,
            reason=f"inside freeze window {window.name!r}: emergency override, one more approver",
        )
    return FreezeDecision(
        frozen=True,
        allowed=False,
        window=window.name,
        reason=f"inside freeze window {window.name!r}: refused without an emergency override",
    )
