"""Risk of a change: score from environment, blast radius, time and freeze -> level -> quorum.

Pure code, no I/O. Points (documented so operators can predict the outcome):

- environment: production 2, staging 1, anything else 0;
- blast radius: share of the environment's hosts touched >= 50% -> 2, > 25% -> 1; more than one
  service touched -> +1;
- time: weekend, or a weekday outside 08:00-18:00 UTC, or Friday from 15:00 UTC -> 1
  (fewer people around to notice and fix);
- freeze: inside a freeze window (emergency override) -> 3.

Level: score <= 1 low, 2-3 medium, >= 4 high. Quorum follows the level: low 0, medium 1, high 2
distinct approvers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

__all__ = ["QUORUM_BY_LEVEL", "RiskAssessment", "assess_risk", "level_for"]

Level = Literal["low", "medium", "high"]
QUORUM_BY_LEVEL: dict[str, int] = {"low": 0, "medium": 1, "high": 2}
_ENV_POINTS = {"production": 2, "prod": 2, "staging": 1}


@dataclass(frozen=True)
class RiskAssessment:
    """A change's risk: total score, level, the quorum it implies and why."""

    score: int
    level: Level
    quorum: int
    factors: tuple[tuple[str, int, str], ...] = field(default_factory=tuple)

    def to_markdown(self) -> str:
        """The assessment as a markdown table."""
        rows = [f"| {name} | {points} | {why} |" for name, points, why in self.factors]
        return "\n".join(
            [
                f"**Risk: {self.level}** (score {self.score}, quorum {self.quorum})",
                "",
                "| factor | points | why |",
                "| --- | --- | --- |",
                *rows,
            ]
        )


def level_for(score: int) -> Level:
    """Map a score to a level: <=1 low, 2-3 medium, >=4 high."""
    if score <= 1:
        return "low"
    return "medium" if score <= 3 else "high"


def assess_risk(
    *,
    environments: list[str],
    hosts_touched: int,
    hosts_total: int,
    services: int,
    at: datetime,
    frozen: bool = False,
) -> RiskAssessment:
    """Score a change; the riskiest environment counts. Raises ValueError for impossible counts."""
    if hosts_total < 0 or hosts_touched < 0 or hosts_touched > hosts_total or services < 0:
        raise ValueError("hosts_touched must be between 0 and hosts_total; counts >= 0")
    factors: list[tuple[str, int, str]] = []
    env_points = max((_ENV_POINTS.get(e, 0) for e in environments), default=0)
    factors.append(("environment", env_points, ", ".join(environments) or "none"))
    share = hosts_touched / hosts_total if hosts_total else 0.0
    radius = 2 if share >= 0.5 else 1 if share > 0.25 else 0
    factors.append(("blast radius", radius, f"{hosts_touched}/{hosts_total} hosts"))
    if services > 1:
        factors.append(("services", 1, f"{services} services"))
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    utc = at.astimezone(UTC)
    off_hours = (
        utc.weekday() >= 5 or not 8 <= utc.hour < 18 or (utc.weekday() == 4 and utc.hour >= 15)
    )
    factors.append(("time", 1 if off_hours else 0, utc.strftime("%a %H:%M UTC")))
    if frozen:
        factors.append(("freeze", 3, "inside a freeze window (emergency override)"))
    score = sum(points for _, points, _ in factors)
    level = level_for(score)
    return RiskAssessment(score, level, QUORUM_BY_LEVEL[level], tuple(factors))
