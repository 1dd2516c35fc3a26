"""Deployment analysis: judging measurements of the real service (pure decisions, no I/O).

In the spirit of Argo Rollouts' AnalysisTemplate: a service's ``analysis`` in ops.yaml lists
named measurements (PromQL, a scrape of the hosts' metrics, or a log count), each with a success
condition, an interval, a count and a failure limit. The tasks layer takes the readings; this
module decides:

- :func:`judge_reading` — one reading: **passed** (the value meets the condition), **failed**,
  or **inconclusive** (no data, NaN, or fewer requests than ``min_requests``: too little traffic
  to say anything — never a pass);
- :func:`judge_measurement` — a measurement's readings: failed once more than ``failure_limit``
  readings failed, inconclusive if any reading was (and it did not fail), else passed;
- :func:`judge_analysis` — all measurements: the worst of them (failed > inconclusive > passed);
- :func:`verification_action` — what a pipeline does with the verdict under the environment's
  ``inconclusive`` policy: proceed, roll back, or pause for a person's decision (a service
  with no measurements configured proceeds on its health checks, reported as not verified);
- :func:`render_query`, :func:`instances_regex`, :func:`reading_interval` — the query a
  measurement sends and when readings are taken.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "AnalysisReport",
    "MeasurementVerdict",
    "Outcome",
    "Reading",
    "ReadingResult",
    "instances_regex",
    "judge_analysis",
    "judge_measurement",
    "judge_reading",
    "meets",
    "reading_interval",
    "render_query",
    "should_stop",
    "verification_action",
    "window_text",
]

_CONDITION = re.compile(r"^\s*(<=|>=|<|>|==)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Outcome(StrEnum):
    """The outcome of a reading, a measurement or a whole analysis."""

    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    NOT_CONFIGURED = "not configured"  # the service's ops.yaml lists no measurements


@dataclass(frozen=True)
class Reading:
    """One reading: the value (None: no data) and the requests it covers (None: not known)."""

    value: float | None
    requests: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class ReadingResult:
    """A judged reading, with the reason in words."""

    outcome: Outcome
    reason: str
    reading: Reading


@dataclass(frozen=True)
class MeasurementVerdict:
    """A measurement's verdict over its readings."""

    name: str
    outcome: Outcome
    reason: str
    readings: tuple[ReadingResult, ...] = ()


def meets(value: float, condition: str) -> bool:
    """True if ``value`` meets ``condition`` (``'< 0.05'``, ``'<= 0'``, ``'>= 0.99'``, ``'== 0'``).

    Raises ValueError for a condition that is not one comparison with a number."""
    match = _CONDITION.match(condition)
    if not match:
        raise ValueError(f"{condition!r} is not a condition such as '< 0.05'")
    return _OPS[match.group(1)](value, float(match.group(2)))


def judge_reading(reading: Reading, *, success: str, min_requests: float = 0) -> ReadingResult:
    """Judge one reading (see the module docstring). Too little traffic is checked before the
    value: 0 errors in 3 requests says nothing about an error ratio."""
    value = reading.value
    if reading.requests is not None and reading.requests < min_requests:
        return ReadingResult(
            Outcome.INCONCLUSIVE,
            f"inconclusive: too little traffic ({reading.requests:g} requests, "
            f"at least {min_requests:g} needed)",
            reading,
        )
    if value is None or math.isnan(value):
        why = reading.detail or "no data"
        return ReadingResult(Outcome.INCONCLUSIVE, f"inconclusive: {why}", reading)
    if meets(value, success):
        return ReadingResult(Outcome.PASSED, f"{value:.4g} meets {success}", reading)
    return ReadingResult(Outcome.FAILED, f"{value:.4g} does not meet {success}", reading)


def should_stop(results: Sequence[ReadingResult], *, failure_limit: int) -> bool:
    """True once more than ``failure_limit`` readings failed (no later reading can save it)."""
    return sum(r.outcome is Outcome.FAILED for r in results) > failure_limit


def judge_measurement(
    name: str, results: Sequence[ReadingResult], *, count: int, failure_limit: int
) -> MeasurementVerdict:
    """A measurement's verdict: failed when more than ``failure_limit`` readings failed;
    inconclusive when any reading was inconclusive or fewer than ``count`` were taken (and it
    did not fail); else passed."""
    failed = sum(r.outcome is Outcome.FAILED for r in results)
    unsure = sum(r.outcome is Outcome.INCONCLUSIVE for r in results)
    last = results[-1].reason if results else "no reading taken"
    if failed > failure_limit:
        worst = next(r for r in reversed(results) if r.outcome is Outcome.FAILED)
        return MeasurementVerdict(
            name,
            Outcome.FAILED,
            f"{name}: {failed} of {len(results)} readings failed (limit {failure_limit}): "
            f"{worst.reason}",
            tuple(results),
        )
    if unsure or len(results) < count:
        first = next((r for r in results if r.outcome is Outcome.INCONCLUSIVE), None)
        return MeasurementVerdict(
            name,
            Outcome.INCONCLUSIVE,
            f"{name}: {unsure} of {len(results)} readings inconclusive: "
            f"{first.reason if first else last}",
            tuple(results),
        )
    return MeasurementVerdict(
        name,
        Outcome.PASSED,
        f"{name}: {len(results)} readings passed ({failed} failed, limit {failure_limit}): {last}",
        tuple(results),
    )


@dataclass(frozen=True)
class AnalysisReport:
    """An analysis: each measurement's verdict and the overall outcome."""

    subject: str
    outcome: Outcome
    verdicts: tuple[MeasurementVerdict, ...] = ()

    def describe(self) -> str:
        """One line for errors, audit events and approval forms."""
        if not self.verdicts:
            return f"analysis of {self.subject}: not verified (no measurements configured)"
        return f"analysis of {self.subject} {self.outcome.value}: " + "; ".join(
            v.reason for v in self.verdicts
        )

    def rows(self) -> list[dict[str, str]]:
        """One table row per reading."""
        out = []
        for verdict in self.verdicts:
            for number, r in enumerate(verdict.readings, start=1):
                out.append(
                    {
                        "measurement": verdict.name,
                        "reading": str(number),
                        "value": "no data" if r.reading.value is None else f"{r.reading.value:.4g}",
                        "requests": "" if r.reading.requests is None else f"{r.reading.requests:g}",
                        "outcome": r.outcome.value,
                        "reason": r.reason,
                    }
                )
        return out


def judge_analysis(subject: str, verdicts: Sequence[MeasurementVerdict]) -> AnalysisReport:
    """The worst verdict wins: failed > inconclusive > passed. No measurements: not configured
    (the service is deployed on its health checks alone, and the report says so)."""
    if not verdicts:
        return AnalysisReport(subject, Outcome.NOT_CONFIGURED, ())
    outcomes = {v.outcome for v in verdicts}
    for outcome in (Outcome.FAILED, Outcome.INCONCLUSIVE):
        if outcome in outcomes:
            return AnalysisReport(subject, outcome, tuple(verdicts))
    return AnalysisReport(subject, Outcome.PASSED, tuple(verdicts))


Action = Literal["proceed", "roll_back", "pause"]


def verification_action(outcome: Outcome, inconclusive: Literal["fail", "pause"]) -> Action:
    """What the pipeline does: passed → proceed; failed → roll back; inconclusive → roll back
    (policy ``fail``) or pause for a person's decision (policy ``pause``); not configured →
    proceed (ops.yaml chose health checks alone; the release notes say it was not verified)."""
    if outcome in (Outcome.PASSED, Outcome.NOT_CONFIGURED):
        return "proceed"
    if outcome is Outcome.FAILED:
        return "roll_back"
    return "pause" if inconclusive == "pause" else "roll_back"


def instances_regex(instances: Sequence[str]) -> str:
    """An anchored-by-PromQL alternation of ``host:port`` instances for ``instance=~"…"``,
    escaped for a double-quoted PromQL string (a ``.`` is a literal dot)."""
    if not instances:
        return "(?!)"  # matches nothing: no host, no data (never every instance)
    return "|".join(re.escape(i).replace("\\", "\\\\") for i in sorted(set(instances)))


def window_text(seconds: float) -> str:
    """A Prometheus range for ``seconds`` (whole seconds, rounded up, at least 1s)."""
    return f"{max(1, math.ceil(seconds))}s"


def render_query(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{instances}``, ``{window}``, ``{service}``, ``{environment}`` in a PromQL template
    (PromQL's own braces, ``{job="web"}``, are left alone). Raises ValueError for an unknown
    placeholder."""

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ValueError(f"unknown placeholder {{{key}}} in query {template!r}")
        return values[key]

    return _PLACEHOLDER.sub(fill, template)


def reading_interval(configured_s: float, count: int, bake_s: float | None) -> float:
    """Seconds between readings: the configured interval, or a bake time spread over the
    ``count`` readings when one is given (> 0). Readings are cumulative since the switch, so a
    short interval means less data — inconclusive, never a pass."""
    if bake_s is not None and bake_s > 0:
        return bake_s / count
    return configured_s
