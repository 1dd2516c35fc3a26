"""Recovery of a deploy whose process died: which hosts to put back, from its audit trail.

Pure code, no I/O. A deploy-pipeline run audits ``deploy.activating`` (the hosts of a batch and
the release each had) before it switches anything, ``deploy.rollback`` per host it put back, and
ends with ``deploy.completed`` or ``deploy.rolled_back``. A run that ended neither way (killed,
its machine lost) may have left hosts switched: every host announced as activating and not
rolled back since is put back on its previous release. A host without a previous release (a
first install) gets ``None``: its ``current`` is removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RecoveryPlan", "plan_recovery"]

FINISHED = ("deploy.completed", "deploy.rolled_back")


@dataclass(frozen=True)
class RecoveryPlan:
    """What a crashed deploy run left to undo.

    ``finished``: the run ended on its own (completed, or its compensation ran): nothing to do.
    ``hosts``: (environment, host) -> the release to go back to (None: remove ``current``).
    """

    service: str | None
    version: str | None
    finished: str | None = None
    hosts: dict[tuple[str, str], str | None] = field(default_factory=dict)


def plan_recovery(events: Iterable[tuple[str, str, Mapping[str, Any]]]) -> RecoveryPlan:
    """The plan from one run's audit events, in chain order: ``(action, subject, details)``.

    Raises ValueError for an activating event without its service/environment subject or
    host list (a trail this code did not write).
    """
    service = version = None
    hosts: dict[tuple[str, str], str | None] = {}
    for action, subject, details in events:
        if action == "deploy.requested":
            service, _, rest = subject.partition("@")
            version = rest.split("->", 1)[0] or None
        elif action == "deploy.activating":
            svc, _, env = subject.partition("/")
            previous = details.get("previous")
            if not svc or not env or not isinstance(previous, Mapping):
                raise ValueError(f"deploy.activating {subject!r}: expected service/env + previous")
            service = service or svc
            version = version or details.get("version")
            for host, release in previous.items():
                hosts[(env, str(host))] = release
        elif action == "deploy.rollback":
            parts = subject.split("/")
            if len(parts) == 3:
                hosts.pop((parts[1], parts[2]), None)
        elif action in FINISHED:
            return RecoveryPlan(service, version, finished=action)
    return RecoveryPlan(service, version, hosts=hosts)
