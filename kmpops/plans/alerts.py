"""Alert-rule semantics: thresholds, durations and Prometheus ``for:`` state machines.

Pure code, no I/O. The contract follows ``rules/alerting.go`` of prometheus/prometheus.

Thresholds (:func:`parse_threshold`): a value with ``%`` is a fraction of one, compared
against a ratio 0..1 (``"80%"`` -> ``0.8``, ``"1%"`` -> ``0.01``); a bare number compares
against the raw value (``"0.8"`` -> ``0.8``, ``"250"`` -> ``250.0``). A rule's query must
therefore return a ratio when its threshold is written with ``%``.

Durations (:func:`parse_duration`): the Prometheus duration grammar, units in descending
order, each at most once: ``y`` (365 d), ``w``, ``d``, ``h``, ``m``, ``s``, ``ms``; e.g.
``5m``, ``1h30m``, ``1d12h``, ``0``.

Rule evaluation (:func:`evaluate`, one step; :func:`evaluate_series`, a replay) mirrors
``AlertingRule.Eval`` of Prometheus 2.42 (the version of the ``promtool`` the conformance
tests run):

- the rule's query returns one value per labelset; ``value <comparison> threshold`` filters
  them exactly as PromQL ``expr > 0.8`` does (NaN never passes);
- a labelset that passes and has no active alert becomes *pending* with ``active_since=now``;
- a pending alert becomes *firing* at the first evaluation with ``now - active_since >= for``
  (so ``for: 0`` yields pending and firing in the same evaluation);
- a labelset that stops passing is dropped when pending, *resolved* when firing (unless
  ``keep_firing_for`` holds it firing: it stays firing while ``now - keep_firing_since <
  keep_firing_for``, ``keep_firing_since`` being the first evaluation it was missing);
- a resolved alert stays in the state map for 15 minutes (Prometheus' ``resolvedRetention``,
  so a notifier can repeat the resolution) and is then dropped; if the labelset passes again,
  even within those 15 minutes, a new alert starts pending with a new ``active_since``.

Replays (:func:`evaluate_series`) look a sample up like PromQL's instant selector in 2.x: the
latest sample at or before the evaluation time and not older than the lookback (5 minutes,
both ends inclusive); a ``None`` value is a missing sample (a gap), not a stale marker.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

__all__ = [
    "RESOLVED_RETENTION",
    "AlertRule",
    "AlertState",
    "Comparison",
    "LabelSet",
    "StateName",
    "Transition",
    "evaluate",
    "evaluate_series",
    "labelset",
    "parse_duration",
    "parse_threshold",
    "states_at",
]

Comparison = Literal[">", ">=", "<", "<="]
StateName = Literal["inactive", "pending", "firing", "resolved"]
LabelSet = tuple[tuple[str, str], ...]
"""A canonical labelset: ``(name, value)`` pairs sorted by name (see :func:`labelset`)."""

RESOLVED_RETENTION = timedelta(minutes=15)
"""How long a resolved alert stays in the state map (Prometheus ``resolvedRetention``)."""

DEFAULT_LOOKBACK = timedelta(minutes=5)
"""PromQL's default lookback delta: how long a sample stays usable."""

_COMPARISONS: tuple[str, ...] = (">", ">=", "<", "<=")

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


def labelset(labels: Mapping[str, str] | Iterable[tuple[str, str]] = (), **more: str) -> LabelSet:
    """Return the canonical labelset (sorted ``(name, value)`` pairs) of ``labels`` + ``more``."""
    pairs = dict(labels.items() if isinstance(labels, Mapping) else labels)
    pairs.update(more)
    return tuple(sorted((str(k), str(v)) for k, v in pairs.items()))


def _passes(comparison: str, value: float, threshold: float) -> bool:
    if comparison == ">":
        return value > threshold
    if comparison == ">=":
        return value >= threshold
    if comparison == "<":
        return value < threshold
    return value <= threshold


@dataclass(frozen=True, kw_only=True)
class AlertRule:
    """One alerting rule: ``query <comparison> threshold`` held for ``duration`` (``for:``).

    Construction validates the fields and raises ValueError naming the rule.
    """

    name: str
    query: str
    threshold: float
    comparison: Comparison = ">"
    duration: timedelta = timedelta(0)
    severity: str = "warning"
    keep_firing_for: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("alert rule: name must not be empty")
        if self.comparison not in _COMPARISONS:
            raise ValueError(
                f"alert rule {self.name!r}: comparison {self.comparison!r} is not one of "
                f"{', '.join(_COMPARISONS)}"
            )
        if isinstance(self.threshold, bool) or not math.isfinite(self.threshold):
            raise ValueError(f"alert rule {self.name!r}: threshold must be a finite number")
        # Normalise so comparisons and serialisation see one type (frozen: set via object).
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.duration < timedelta(0) or self.keep_firing_for < timedelta(0):
            raise ValueError(f"alert rule {self.name!r}: durations must not be negative")

    @classmethod
    def from_spec(
        cls, name: str, spec: Mapping[str, Any], *, query: str | None = None
    ) -> AlertRule:
        """Build a rule from the guide's block, e.g. ``{threshold: 80%, duration: 5m, severity:
        warning, query: ...}``; ``query`` is used when the block has none.

        Raises ValueError naming the rule and field when a value is missing or invalid.
        """
        try:
            rule_query = spec.get("query") or query
            if not rule_query:
                raise ValueError("no query given")
            return cls(
                name=name,
                query=str(rule_query),
                threshold=parse_threshold(spec["threshold"]),
                comparison=spec.get("comparison", ">"),
                duration=parse_duration(spec.get("duration", "0")),
                severity=str(spec.get("severity", "warning")),
                keep_firing_for=parse_duration(spec.get("keep_firing_for", "0")),
            )
        except KeyError as exc:
            raise ValueError(f"alert rule {name!r}: missing {exc.args[0]!r}") from None
        except ValueError as exc:
            if str(exc).startswith("alert rule"):
                raise
            raise ValueError(f"alert rule {name!r}: {exc}") from None

    @property
    def expr(self) -> str:
        """The equivalent PromQL alerting expression, e.g. ``(cpu_ratio) > 0.8``."""
        return f"({self.query}) {self.comparison} {self.threshold!r}"

    def passes(self, value: float | None) -> bool:
        """Whether a query result passes the comparison (None and NaN never do)."""
        return value is not None and _passes(self.comparison, value, self.threshold)


@dataclass(kw_only=True)
class AlertState:
    """The state of one alert (a rule and one labelset), as kept between evaluations.

    ``to_dict``/``from_dict`` round-trip it through JSON-safe values so a restarted evaluator
    keeps ``active_since`` (and so the ``for:`` clock).
    """

    rule: str
    labels: LabelSet
    state: StateName
    active_since: datetime | None = None
    fired_at: datetime | None = None
    resolved_at: datetime | None = None
    last_value: float | None = None
    last_eval: datetime | None = None
    keep_firing_since: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: times as ISO 8601 strings, labels as a mapping."""
        return {
            "rule": self.rule,
            "labels": dict(self.labels),
            "state": self.state,
            "active_since": _iso(self.active_since),
            "fired_at": _iso(self.fired_at),
            "resolved_at": _iso(self.resolved_at),
            "last_value": self.last_value,
            "last_eval": _iso(self.last_eval),
            "keep_firing_since": _iso(self.keep_firing_since),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertState:
        """Rebuild a state written by :meth:`to_dict`; raises ValueError on a bad record."""
        try:
            state = data["state"]
            if state not in ("inactive", "pending", "firing", "resolved"):
                raise ValueError(f"unknown state {state!r}")
            value = data.get("last_value")
            return cls(
                rule=str(data["rule"]),
                labels=labelset(data.get("labels") or {}),
                state=state,
                active_since=_from_iso(data.get("active_since")),
                fired_at=_from_iso(data.get("fired_at")),
                resolved_at=_from_iso(data.get("resolved_at")),
                last_value=None if value is None else float(value),
                last_eval=_from_iso(data.get("last_eval")),
                keep_firing_since=_from_iso(data.get("keep_firing_since")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid alert state record: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Transition:
    """A state change that drives a notification: to ``pending``, ``firing`` or ``resolved``."""

    rule: str
    labels: Hashable
    severity: str
    previous: StateName
    state: StateName
    at: datetime
    value: float | None
    active_since: datetime | None


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _from_iso(text: str | None) -> datetime | None:
    if text is None:
        return None
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def evaluate(
    rule: AlertRule,
    samples: Mapping[Hashable, float | None],
    previous: Mapping[Hashable, AlertState],
    now: datetime,
) -> tuple[dict[Hashable, AlertState], list[Transition]]:
    """Evaluate ``rule`` once at ``now`` on the query result ``samples`` (labelset -> value).

    ``previous`` is the state map returned by the previous evaluation (empty at first); it is
    not modified. Returns the new state map (pending, firing and recently resolved alerts)
    and the transitions of this evaluation, in order (``for: 0`` gives pending then firing).
    Keys are used as given; use :func:`labelset` for canonical ones. ``None`` values are
    absent samples. Pure: raises nothing for well-typed input.
    """
    states: dict[Hashable, AlertState] = {}
    transitions: list[Transition] = []

    def note(st: AlertState, before: StateName) -> None:
        transitions.append(
            Transition(
                rule=rule.name,
                labels=st.labels,
                severity=rule.severity,
                previous=before,
                state=st.state,
                at=now,
                value=st.last_value,
                active_since=st.active_since,
            )
        )

    passing = {ls: v for ls, v in samples.items() if rule.passes(v)}
    for ls, value in passing.items():
        prev = previous.get(ls)
        if prev is not None and prev.state in ("pending", "firing"):
            st = replace(prev, last_value=value, last_eval=now, keep_firing_since=None)
        else:
            st = AlertState(
                rule=rule.name,
                labels=ls,  # type: ignore[arg-type]
                state="pending",
                active_since=now,
                last_value=value,
                last_eval=now,
            )
            note(st, prev.state if prev is not None else "inactive")
        if st.state == "pending" and now - st.active_since >= rule.duration:  # type: ignore[operator]
            st.state = "firing"
            st.fired_at = now
            note(st, "pending")
        states[ls] = st

    for ls, prev in previous.items():
        if ls in passing:
            continue
        if prev.state == "firing":
            if rule.keep_firing_for > timedelta(0):
                since = prev.keep_firing_since or now
                if now - since < rule.keep_firing_for:
                    states[ls] = replace(prev, keep_firing_since=since, last_eval=now)
                    continue
            st = replace(prev, state="resolved", resolved_at=now, last_eval=now)
            st.keep_firing_since = None
            states[ls] = st
            note(st, "firing")
        elif prev.state == "resolved" and prev.resolved_at is not None:
            if now - prev.resolved_at <= RESOLVED_RETENTION:
                states[ls] = prev
        # a pending alert that stops passing is dropped without a notification
    return states, transitions


SeriesTime = datetime | float
Sample = tuple[SeriesTime, float | None]


def _to_seconds(when: SeriesTime) -> float:
    if isinstance(when, datetime):
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return float(when)


def _to_ms(when: SeriesTime) -> int:
    if isinstance(when, datetime):
        aware = when if when.tzinfo else when.replace(tzinfo=UTC)
        delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
        return delta // timedelta(milliseconds=1)
    return round(float(when) * 1000)


def _ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def evaluate_series(
    rule: AlertRule,
    series: Mapping[Hashable, Sequence[Sample]],
    *,
    start: SeriesTime,
    end: SeriesTime,
    interval: timedelta,
    lookback: timedelta = DEFAULT_LOOKBACK,
) -> list[tuple[SeriesTime, Hashable, StateName]]:
    """Replay stored ``series`` (labelset -> ``(time, value)`` samples in ascending time order)
    through ``rule``, evaluating at ``start``, ``start + interval``, ... up to ``end``.

    Returns the state changes ``(time, labelset, state)`` in time order, ``state`` being
    ``pending``, ``firing``, ``resolved`` (a firing alert ended) or ``inactive`` (a pending one
    was dropped); the same decisions as calling :func:`evaluate` at every step. Times come back
    as datetimes (UTC) when ``start`` is a datetime, else as epoch seconds; sample times may be
    either (epoch seconds, millisecond resolution). Raises ValueError for a non-positive
    interval or ``end`` before ``start``.
    """
    step = _ms(interval)
    if step <= 0:
        raise ValueError(f"alert replay: interval must be positive, got {interval!r}")
    t0, t_end = _to_ms(start), _to_ms(end)
    if t_end < t0:
        raise ValueError("alert replay: end is before start")
    n_evals = (t_end - t0) // step + 1
    hold, keep, back = _ms(rule.duration), _ms(rule.keep_firing_for), _ms(lookback)
    threshold, comparison = float(rule.threshold), rule.comparison
    # passes(v) for a float v; NaN fails every comparison, like PromQL's filter.
    passes = {
        ">": threshold.__lt__,
        ">=": threshold.__le__,
        "<": threshold.__gt__,
        "<=": threshold.__ge__,
    }[comparison]

    changes: list[tuple[int, Hashable, StateName]] = []
    emit = changes.append
    for ls, samples in series.items():
        values = [v for _, v in samples if v is not None]
        if not any(map(passes, values)):
            continue  # never above the threshold: no alert, no state change
        if samples and isinstance(samples[0][0], datetime):
            times = [_to_seconds(t) for t, v in samples if v is not None]
        else:
            times = [t for t, v in samples if v is not None]  # type: ignore[misc]
        # First and last evaluation that can see a sample; nothing happens outside.
        first_k = max(0, -(-(round(times[0] * 1000) - t0) // step))
        last_k = min(n_evals - 1, (round(times[-1] * 1000) + back - t0) // step + 1)
        if keep:
            last_k = min(n_evals - 1, last_k + keep // step + 1)
        state = 0  # 0 inactive, 1 pending, 2 firing
        since = 0
        keep_since = -1
        j = 0
        for k in range(first_k, last_k + 1):
            t = t0 + k * step
            ts = t / 1000
            j = bisect_right(times, ts, j)
            if j and times[j - 1] >= (t - back) / 1000 and passes(values[j - 1]):
                if state == 0:
                    state, since = 1, t
                    emit((t, ls, "pending"))
                if state == 1 and t - since >= hold:
                    state = 2
                    emit((t, ls, "firing"))
                keep_since = -1
            elif state == 2:
                if keep:
                    if keep_since < 0:
                        keep_since = t
                    if t - keep_since < keep:
                        continue
                    keep_since = -1
                state = 0
                emit((t, ls, "resolved"))
            elif state == 1:
                state = 0
                emit((t, ls, "inactive"))

    changes.sort(key=lambda c: c[0])
    if isinstance(start, datetime):
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return [(epoch + timedelta(milliseconds=t), ls, st) for t, ls, st in changes]
    return [(t / 1000, ls, st) for t, ls, st in changes]


def states_at(
    changes: Iterable[tuple[SeriesTime, Hashable, StateName]],
    times: Iterable[SeriesTime],
) -> dict[SeriesTime, dict[Hashable, StateName]]:
    """Fold :func:`evaluate_series` output into the active states (pending/firing) at ``times``.

    ``times`` must be in ascending order; a change at exactly ``t`` counts at ``t``.
    """
    ordered = list(changes)
    result: dict[SeriesTime, dict[Hashable, StateName]] = {}
    current: dict[Hashable, StateName] = {}
    i = 0
    for when in times:
        while i < len(ordered) and ordered[i][0] <= when:
            _, ls, st = ordered[i]
            if st in ("pending", "firing"):
                current[ls] = st
            else:
                current.pop(ls, None)
            i += 1
        result[when] = dict(current)
    return result
