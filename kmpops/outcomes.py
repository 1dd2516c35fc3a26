"""One host's outcome of one step: the value it produced or the error it raised.

Pure code. Every per-host step (a ``Fleet`` run, a deploy task's batch) reports with this one
type, so callers test ``outcome.ok`` and read ``outcome.failure`` ("Type: message", the words a
run's message and the ``deploy-host-failures`` table show) instead of parsing strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["HostOutcome", "failures_of"]

T = TypeVar("T")


@dataclass
class HostOutcome(Generic[T]):
    """The outcome of one step on one host: its value or the error it raised."""

    host: str
    ok: bool
    value: T | None
    error: BaseException | None
    duration_s: float

    @classmethod
    def succeeded(cls, host: str, value: T, duration_s: float = 0.0) -> HostOutcome[T]:
        """A host whose step returned ``value``."""
        return cls(host, True, value, None, duration_s)

    @classmethod
    def failed(cls, host: str, error: BaseException, duration_s: float = 0.0) -> HostOutcome[T]:
        """A host whose step raised ``error``."""
        return cls(host, False, None, error, duration_s)

    @property
    def failure(self) -> str | None:
        """``"<ErrorType>: <message>"`` for a failed host, None for one that succeeded."""
        if self.ok:
            return None
        if self.error is None:
            return "failed"
        return f"{type(self.error).__name__}: {self.error}"

    def unwrap(self) -> T:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def failures_of(outcomes: Mapping[str, HostOutcome[object]]) -> dict[str, str]:
    """host -> ``failure`` of every failed outcome, in the order given (for
    :func:`kmpops.plans.failures.group_failures` and the per-host failure table)."""
    return {h: o.failure or "failed" for h, o in outcomes.items() if not o.ok}
