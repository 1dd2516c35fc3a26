"""``provision-access``: add or remove one user's public key on the hosts of an environment.

Plan, then apply: every host's authorized_keys is read, the plan says which hosts change; with
``dry_run`` the plan is the result. Authority comes from ops.yaml, never from the parameters:
the file written is each host's configured authorized_keys (there is no path parameter), and
the key must parse as ``[options] type base64 [comment]`` with options only from
``access.key_options``. The plan and the approval show every path and the exact line. An
environment whose policy requires approval pauses for it (``tasks.approval.request_approval``);
a refusal changes nothing. Each host is then written atomically and read back. Compensation:
if any host fails, every host that was written — and the failed one — gets its previous
authorized_keys back, and the run fails.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kmpops.access import (
    AuthorizedKey,
    add_key,
    parse_authorized_keys,
    parse_offered_key,
    remove_keys,
)
from kmpops.config import Name
from kmpops.errors import KmpOpsError, PolicyViolation
from kmpops.plans.access import plan_key_change
from tasks.access import read_host_keys, replace_authorized_keys, restore_authorized_keys
from tasks.approval import requester_for_run
from tasks.audit import anchor_after_change
from tasks.common import audit, ops_config
from tasks.locks import host_targets, locked
from tasks.reports import markdown_table, publish_report


class ProvisionFailed(KmpOpsError):
    """Some hosts could not be changed; every host was put back as it was."""


REMOVED_PARAMETERS = {
    "authorized_keys_path": (
        "authorized_keys_path is not a parameter: where authorized_keys lives comes from "
        "ops.yaml (the host var authorized_keys, or access.authorized_keys)"
    ),
}


def refuse_removed(data: Any, removed: dict[str, str]) -> Any:
    """A ``mode="before"`` validator body: refuse parameters that used to widen authority."""
    if isinstance(data, dict):
        for name, why in removed.items():
            if name in data:
                raise ValueError(why)
    return data


class AccessChange(BaseModel):
    """One key for one user on one environment. The public key is not a secret."""

    model_config = ConfigDict(extra="forbid")

    user: Name
    public_key: str = Field(
        description="'type base64 [comment]'; options only from ops.yaml access.key_options"
    )
    environment: Name
    action: Literal["add", "remove"] = "add"
    reason: str = ""
    requested_by: str = ""
    dry_run: bool = False

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return refuse_removed(data, REMOVED_PARAMETERS)

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        # syntax here (no config at validation); the flow checks options against ops.yaml
        parse_offered_key(value, allowed_options=None)
        return value.strip()


def _restore(snapshots: dict[str, dict[str, str]], hosts: list[str]) -> dict[str, str]:
    """Write the previous text back on ``hosts``; returns host → error for those that failed."""
    futures = {h: restore_authorized_keys.submit(h, snapshots[h]["text"]) for h in hosts}
    errors = {}
    for host, fut in futures.items():
        try:
            fut.result()
        except Exception as exc:
            errors[host] = f"{type(exc).__name__}: {exc}"
    return errors


def render_plan(
    change: AccessChange, key: AuthorizedKey, rows: list[dict[str, Any]], to_change: list[str]
) -> str:
    """The plan as markdown (artifact and approval text): the exact line and every path."""
    verb = "written to" if change.action == "add" else "removed from"
    return (
        f"**{change.action}** key `{key.fingerprint}` ({key.comment}) of **{change.user}** on "
        f"{change.environment}: {len(to_change)} of {len(rows)} hosts change.\n\n"
        f"Line {verb} each host's authorized_keys:\n\n```\n{key.line()}\n```\n\n"
        + (f"Reason: {change.reason}\n\n" if change.reason else "")
        + markdown_table(rows)
    )


@flow(name="provision-access", task_runner=ThreadPoolTaskRunner(max_workers=16))
@locked(lambda change: [] if change.dry_run else host_targets(change.environment))
def provision_access(change: AccessChange) -> dict[str, Any]:
    """Add or remove ``change.public_key`` on every host of ``change.environment``.

    Returns the plan and the hosts changed. Raises PolicyViolation when approval is refused
    (nothing changed), ProvisionFailed when a host failed (all hosts restored first).
    """
    logger = get_run_logger()
    cfg = ops_config()
    env = cfg.environment(change.environment)
    # options matter only for what is written: a key is removed by its fingerprint
    allowed = cfg.access.key_options if change.action == "add" else None
    try:
        key = parse_offered_key(change.public_key, allowed_options=allowed)
    except ValueError as exc:
        raise PolicyViolation(f"public_key refused: {exc}") from None
    if not key.comment:
        key = AuthorizedKey(key.key_type, key.key_b64, change.user, key.options)
    subject = f"access {change.action} {change.user} {key.fingerprint} on {change.environment}"
    hosts = [h.name for h in env.hosts]
    reads = {h: read_host_keys.submit(h) for h in hosts}
    snapshots = {h: fut.result() for h, fut in reads.items()}
    plan = plan_key_change(
        {h: parse_authorized_keys(s["text"]) for h, s in snapshots.items()}, key, change.action
    )
    to_change = [c.host for c in plan if c.changes]
    rows = [
        {
            "host": c.host,
            "path": snapshots[c.host]["path"],
            "action": c.action,
            "changes": c.changes,
        }
        for c in plan
    ]
    plan_md = render_plan(change, key, rows, to_change)
    if change.dry_run or not to_change:
        publish_report("provision-access", "# Provision access (plan)\n\n" + plan_md + "\n", rows)
        audit("access.plan", subject, hosts=to_change, dry_run=change.dry_run)
        return {"plan": rows, "changed": [], "dry_run": change.dry_run}
    requested_by = requester_for_run(change.requested_by)
    if env.policy.approval_required:
        from tasks.approval import request_approval

        outcome = request_approval(
            subject=subject,
            summary_markdown=plan_md,
            policy=env.policy,
            requested_by=requested_by,
        )
        if not outcome.approved:
            audit("access.refused", subject, outcome=outcome.summary())
            raise PolicyViolation(f"{subject}: {outcome.summary()}")
    futures = {}
    for host in to_change:
        text = snapshots[host]["text"]
        new = add_key(text, key) if change.action == "add" else remove_keys(text, [key.fingerprint])
        futures[host] = replace_authorized_keys.submit(host, new)
    failed: dict[str, str] = {}
    for host, fut in futures.items():
        try:
            fut.result()
        except Exception as exc:
            failed[host] = f"{type(exc).__name__}: {exc}"
    if failed:
        logger.error("provisioning failed on %s; restoring every host", ", ".join(failed))
        restore_errors = _restore(snapshots, to_change)
        audit("access.rolled_back", subject, failed=failed, restore_errors=restore_errors)
        publish_report(
            "provision-access",
            "# Provision access — FAILED, rolled back\n\n"
            + plan_md
            + "\n\nFailed: "
            + "; ".join(f"{h}: {e}" for h, e in failed.items())
            + (f"\n\nNOT restored: {restore_errors}" if restore_errors else "")
            + "\n",
            rows,
        )
        raise ProvisionFailed(
            f"{subject}: failed on {', '.join(failed)}; "
            + (
                "all hosts restored"
                if not restore_errors
                else f"restore failed on {restore_errors}"
            )
        )
    audit("access.changed", subject, hosts=to_change, requested_by=requested_by)
    if change.environment == "production":
        anchor_after_change(f"provision-access {subject}")
    publish_report("provision-access", "# Provision access — done\n\n" + plan_md + "\n", rows)
    return {"plan": rows, "changed": to_change, "dry_run": False}
