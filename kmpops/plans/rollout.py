"""Rollout plans: which hosts are changed in which batch, and when a rollout must stop.

Pure code, no I/O. ``batch_size`` is a host count (``2``) or a percentage of the environment's
hosts (``"25%"``, rounded up, at least one host per batch). ``max_failures`` is how many hosts may
fail (and be rolled back individually) before the whole rollout stops and every touched host is
rolled back; ``0`` means the first failure stops everything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["RolloutPlan", "batch_count", "plan_rollout", "rollout_must_stop"]

_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)%")


def batch_count(batch_size: str | int, host_count: int) -> int:
    """Hosts per batch for ``batch_size`` (count or ``"N%"``) over ``host_count`` hosts.

    A percentage is rounded up and is at least 1; a count is capped at ``host_count``.
    Raises ValueError for a size below 1, a percentage outside (0, 100] or unparsable text.
    """
    if host_count < 1:
        raise ValueError("a rollout needs at least one host")
    if isinstance(batch_size, bool):
        raise ValueError(f"batch_size {batch_size!r} is not a count or a percentage")
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        return min(batch_size, host_count)
    text = str(batch_size).strip()
    if text.isdigit():
        return batch_count(int(text), host_count)
    match = _PERCENT_RE.fullmatch(text)
    if not match or not 0 < float(match.group(1)) <= 100:
        raise ValueError(f"batch_size {batch_size!r} is not a count or a percentage in (0%, 100%]")
    # Round before ceil so that 3 x 33.333...% does not become 1.0000001 -> 2.
    return max(1, math.ceil(round(host_count * float(match.group(1)) / 100, 9)))


@dataclass(frozen=True)
class RolloutPlan:
    """The ordered batches of one rollout of ``service`` ``version`` to ``environment``."""

    service: str
    version: str
    environment: str
    batches: tuple[tuple[str, ...], ...]
    max_failures: int = 0
    batch_size: str | int = "25%"
    previous: dict[str, str | None] = field(default_factory=dict)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host of the plan, in rollout order."""
        return tuple(h for batch in self.batches for h in batch)

    def to_markdown(self) -> str:
        """The plan as a markdown document (artifact and approval-form description)."""
        lines = [
            f"### Rollout of `{self.service}` `{self.version}` to **{self.environment}**",
            "",
            f"{len(self.hosts)} hosts in {len(self.batches)} batches "
            f"(batch size `{self.batch_size}`, max failures {self.max_failures}).",
            "",
            "| batch | host | current release |",
            "| --- | --- | --- |",
        ]
        for number, batch in enumerate(self.batches, start=1):
            for host in batch:
                current = self.previous.get(host) or "(first install)"
                lines.append(f"| {number} | {host} | {current} |")
        return "\n".join(lines)


def plan_rollout(
    hosts: Sequence[str],
    *,
    service: str,
    version: str,
    environment: str,
    batch_size: str | int = "25%",
    max_failures: int = 0,
    previous: dict[str, str | None] | None = None,
) -> RolloutPlan:
    """Split ``hosts`` (in the given order) into batches of ``batch_count(batch_size, len)``.

    Raises ValueError for no hosts, duplicate hosts, a bad batch size or negative max_failures.
    """
    hosts = list(hosts)
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    if dupes:
        raise ValueError(f"duplicate hosts in rollout: {', '.join(dupes)}")
    if max_failures < 0:
        raise ValueError("max_failures must be 0 or more")
    size = batch_count(batch_size, len(hosts))
    batches = tuple(tuple(hosts[i : i + size]) for i in range(0, len(hosts), size))
    return RolloutPlan(
        service=service,
        version=version,
        environment=environment,
        batches=batches,
        max_failures=max_failures,
        batch_size=batch_size,
        previous=dict(previous or {}),
    )


def rollout_must_stop(failures: int, max_failures: int) -> bool:
    """True when ``failures`` hosts failed and that is more than ``max_failures`` allows."""
    return failures > max_failures
