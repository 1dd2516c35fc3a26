"""``access-review``: who can log in where, compared with the access list.

Reads every host's authorized_keys (by key fingerprint and comment) and compares it with the
``access`` parameter (users → keys, environments, expiry; :mod:`kmpops.plans.access`). The
drift report names unknown keys, keys outside their grant's environments, missing keys and
expired grants still present. kmp-ops' own keys are recognised and listed as service keys.
Read-only; the outcome goes to the audit chain; ``fail_on_drift`` fails the run on drift.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.provision_access import REMOVED_PARAMETERS, refuse_removed
from kmpops.access import AuthorizedKey, parse_authorized_keys
from kmpops.errors import PolicyViolation
from kmpops.plans.access import AccessList, access_drift
from tasks.access import read_host_keys, service_fingerprints
from tasks.common import audit, ops_config
from tasks.reports import markdown_table, publish_report


class AccessReviewRequest(BaseModel):
    """The access list to review against, and where."""

    access: AccessList = Field(default_factory=AccessList)
    environment: str | None = Field(default=None, description="default: every environment")
    fail_on_drift: bool = False

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return refuse_removed(data, REMOVED_PARAMETERS)


@flow(name="access-review", task_runner=ThreadPoolTaskRunner(max_workers=16))
def access_review(request: AccessReviewRequest | None = None) -> dict[str, Any]:
    """Review access on every host; returns the inventory and the drift.

    Unreachable hosts are listed (not judged). Raises PolicyViolation after publishing when
    ``fail_on_drift`` and there is drift or an unreachable host.
    """
    req = request or AccessReviewRequest()
    cfg = ops_config()
    envs = (
        {req.environment: cfg.environment(req.environment)} if req.environment else cfg.environments
    )
    host_env = {h.name: name for name, env in envs.items() for h in env.hosts}
    futures = {h: read_host_keys.submit(h) for h in host_env}
    found: dict[str, list[AuthorizedKey]] = {}
    unreachable: dict[str, str] = {}
    for host, fut in futures.items():
        try:
            found[host] = parse_authorized_keys(fut.result()["text"])
        except Exception as exc:
            unreachable[host] = f"{type(exc).__name__}: {exc}"
    ours = service_fingerprints(cfg)
    now = datetime.now(UTC)
    drift = access_drift(found, host_env, req.access, now=now, service_fingerprints=ours)
    owner = {fp: g.user for g in req.access.users for fp in g.fingerprints()}
    inventory = [
        {
            "host": host,
            "environment": host_env[host],
            "fingerprint": k.fingerprint,
            "comment": k.comment,
            "user": "kmp-ops (service)" if k.fingerprint in ours else owner.get(k.fingerprint, "?"),
        }
        for host, keys in found.items()
        for k in keys
    ]
    drift_rows = [
        {
            "host": d.host,
            "drift": d.kind,
            "fingerprint": d.fingerprint,
            "user": d.user,
            "comment": d.comment,
            "detail": d.detail,
        }
        for d in drift
    ]
    drift_rows += [
        {
            "host": h,
            "drift": "unreachable",
            "fingerprint": "",
            "user": "",
            "comment": "",
            "detail": e,
        }
        for h, e in unreachable.items()
    ]
    md = (
        f"# Access review — {'drift found' if drift_rows else 'no drift'}\n\n"
        f"{len(found)} hosts read, {len(unreachable)} unreachable, {len(inventory)} keys, "
        f"{len(req.access.users)} users in the access list.\n\n## Drift\n\n"
        + markdown_table(drift_rows)
        + "\n\n## Who has access\n\n"
        + markdown_table(inventory)
        + "\n"
    )
    publish_report("access-review", md, drift_rows, description="access drift")
    audit(
        "access.review",
        req.environment or "all",
        drift=[f"{d['host']}:{d['drift']}:{d['fingerprint']}" for d in drift_rows],
        keys=len(inventory),
    )
    if drift_rows and req.fail_on_drift:
        raise PolicyViolation(f"access drift on {len({d['host'] for d in drift_rows})} hosts")
    return {"drift": drift_rows, "inventory": inventory, "unreachable": unreachable}
