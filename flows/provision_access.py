"""``provision-access``: add or remove one user's public key on the hosts of an environment.

Plan, then apply: every host's authorized_keys is read, the plan says which hosts change; with
``dry_run`` the plan is the result. An environment whose policy requires approval pauses for it
(``tasks.approval.request_approval``); a refusal changes nothing. Each host is then written
atomically and read back. Compensation: if any host fails, every host that was written — and
the failed one — gets its previous authorized_keys back, and the run fails.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from kmpops.access import add_key, parse_authorized_keys, parse_public_key, remove_keys
from kmpops.config import Name
from kmpops.errors import KmpOpsError, PolicyViolation
from kmpops.plans.access import plan_key_change
from tasks.access import read_host_keys, replace_authorized_keys, restore_authorized_keys
from tasks.approval import requester_for_run
from tasks.common import audit, ops_config
from tasks.reports import markdown_table, publish_report


class ProvisionFailed(KmpOpsError):
    """Some hosts could not be changed; every host was put back as it was."""


class AccessChange(BaseModel):
    """One key for one user on one environment. The public key is not a secret."""

    user: Name
    public_key: str = Field(description="'type base64 [comment]'")
    environment: Name
    action: Literal["add", "remove"] = "add"
    reason: str = ""
    requested_by: str = ""
    dry_run: bool = False
    authorized_keys_path: str | None = None

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        parse_public_key(value)
        return value.strip()


def _restore(snapshots: dict[str, dict[str, str]], hosts: list[str]) -> dict[str, str]:
    """Write the previous text back on ``hosts``; returns host → error for those that failed."""
    futures = {
        h: restore_authorized_keys.submit(h, snapshots[h]["path"], snapshots[h]["text"])
        for h in hosts
    }
    errors = {}
    for host, fut in futures.items():
        try:
            fut.result()
        except Exception as exc:
            errors[host] = f"{type(exc).__name__}: {exc}"
    return errors


@flow(name="provision-access", task_runner=ThreadPoolTaskRunner(max_workers=16))
def provision_access(change: AccessChange) -> dict[str, Any]:
    """Add or remove ``change.public_key`` on every host of ``change.environment``.

    Returns the plan and the hosts changed. Raises PolicyViolation when approval is refused
    (nothing changed), ProvisionFailed when a host failed (all hosts restored first).
    """
    logger = get_run_logger()
    cfg = ops_config()
    env = cfg.environment(change.environment)
    key = parse_public_key(change.public_key)
    if not key.comment:
        key = key.__class__(key.key_type, key.key_b64, change.user)
    subject = f"access {change.action} {change.user} {key.fingerprint} on {change.environment}"
    hosts = [h.name for h in env.hosts]
    reads = {h: read_host_keys.submit(h, change.authorized_keys_path) for h in hosts}
    snapshots = {h: fut.result() for h, fut in reads.items()}
    plan = plan_key_change(
        {h: parse_authorized_keys(s["text"]) for h, s in snapshots.items()}, key, change.action
    )
    to_change = [c.host for c in plan if c.changes]
    rows = [{"host": c.host, "action": c.action, "changes": c.changes} for c in plan]
    plan_md = (
        f"**{change.action}** key `{key.fingerprint}` ({key.comment}) of **{change.user}** on "
        f"{change.environment}: {len(to_change)} of {len(hosts)} hosts change.\n\n"
        + (f"Reason: {change.reason}\n\n" if change.reason else "")
        + markdown_table(rows)
    )
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
        futures[host] = replace_authorized_keys.submit(host, snapshots[host]["path"], new)
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
    publish_report("provision-access", "# Provision access — done\n\n" + plan_md + "\n", rows)
    return {"plan": rows, "changed": to_change, "dry_run": False}
