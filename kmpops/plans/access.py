"""Access management decisions: who should have SSH access where, and the drift from it.

Pure code, no I/O. The :class:`AccessList` (a flow parameter: users, their public keys, the
environments they may reach, and when the grant expires) is compared with the keys found in
each host's authorized_keys (:func:`access_drift`): unknown keys, keys outside their grant's
environments, missing keys and expired grants still present. :func:`plan_key_change` says which
hosts an add/remove of one key changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kmpops.access import AuthorizedKey, parse_public_key
from kmpops.config import Name

__all__ = [
    "AccessGrant",
    "AccessList",
    "DriftItem",
    "KeyChange",
    "access_drift",
    "plan_key_change",
]

DriftKind = Literal["unknown-key", "out-of-scope", "missing-key", "expired-grant"]


class AccessGrant(BaseModel):
    """One user's access: public keys (``type base64 [comment]``), environments, expiry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: Name
    public_keys: list[str] = Field(min_length=1)
    environments: list[Name] = Field(min_length=1)
    expires: datetime | None = Field(default=None, description="timezone-aware; None: no expiry")

    @field_validator("public_keys")
    @classmethod
    def _public_keys(cls, value: list[str]) -> list[str]:
        for i, line in enumerate(value):
            try:
                parse_public_key(line)
            except ValueError as exc:
                raise ValueError(f"public_keys[{i}]: {exc}") from None
        return value

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("expires must be timezone-aware")
        return value

    def fingerprints(self) -> set[str]:
        """Fingerprints of the grant's keys."""
        return {parse_public_key(k).fingerprint for k in self.public_keys}

    def expired(self, now: datetime) -> bool:
        """True if the grant has an expiry at or before ``now``."""
        return self.expires is not None and self.expires <= now


class AccessList(BaseModel):
    """Who may log in where."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: list[AccessGrant] = Field(default_factory=list)

    @field_validator("users")
    @classmethod
    def _unique(cls, value: list[AccessGrant]) -> list[AccessGrant]:
        names = [g.user for g in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"users listed twice: {', '.join(dupes)}")
        return value


@dataclass(frozen=True)
class DriftItem:
    """One difference between the access list and a host."""

    host: str
    kind: DriftKind
    fingerprint: str
    user: str = ""
    comment: str = ""
    detail: str = ""


def access_drift(
    found: Mapping[str, Sequence[AuthorizedKey]],
    host_environment: Mapping[str, str],
    access: AccessList,
    *,
    now: datetime,
    service_fingerprints: frozenset[str] = frozenset(),
) -> list[DriftItem]:
    """Drift per host, ordered by host then kind then fingerprint.

    ``found`` maps host → keys present; ``service_fingerprints`` are kmp-ops' own keys (always
    allowed). Hosts not in ``found`` (unreachable) are not judged.
    """
    by_fp: dict[str, AccessGrant] = {}
    for grant in access.users:
        for fp in grant.fingerprints():
            by_fp[fp] = grant
    items: list[DriftItem] = []
    for host, keys in found.items():
        env = host_environment[host]
        present = {k.fingerprint: k for k in keys}
        for fp, key in present.items():
            if fp in service_fingerprints:
                continue
            grant = by_fp.get(fp)
            if grant is None:
                items.append(
                    DriftItem(host, "unknown-key", fp, comment=key.comment, detail="in no grant")
                )
            elif grant.expired(now):
                items.append(
                    DriftItem(
                        host,
                        "expired-grant",
                        fp,
                        grant.user,
                        key.comment,
                        f"grant expired {grant.expires.isoformat() if grant.expires else ''}",
                    )
                )
            elif env not in grant.environments:
                items.append(
                    DriftItem(
                        host,
                        "out-of-scope",
                        fp,
                        grant.user,
                        key.comment,
                        f"granted for {', '.join(grant.environments)}, not {env}",
                    )
                )
        for grant in access.users:
            if env not in grant.environments or grant.expired(now):
                continue
            for fp in sorted(grant.fingerprints() - set(present)):
                items.append(DriftItem(host, "missing-key", fp, grant.user, detail="granted"))
    order = {"unknown-key": 0, "expired-grant": 1, "out-of-scope": 2, "missing-key": 3}
    return sorted(items, key=lambda i: (i.host, order[i.kind], i.fingerprint))


@dataclass(frozen=True)
class KeyChange:
    """What adding or removing one key does on one host."""

    host: str
    action: Literal["add", "remove"]
    changes: bool


def plan_key_change(
    found: Mapping[str, Sequence[AuthorizedKey]],
    key: AuthorizedKey,
    action: Literal["add", "remove"],
) -> list[KeyChange]:
    """Per host (in the given order): does ``action`` on ``key`` change its authorized_keys?"""
    plan = []
    for host, keys in found.items():
        present = any(k.fingerprint == key.fingerprint for k in keys)
        plan.append(KeyChange(host, action, present if action == "remove" else not present))
    return plan
