"""Anchoring the audit chain: a checkpoint of its head, signed, in write-once storage.

``checkpoint_audit_chain`` is the reusable step: the ``audit-checkpoint`` flow runs it on a
schedule, and a production change (``deploy-pipeline``, and any flow that changes production)
calls it at its end. It verifies the chain first and refuses to anchor a broken one.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common import records, retry_on_transient

__all__ = ["anchor_after_change", "checkpoint_audit_chain"]


@task(
    name="checkpoint-audit-chain",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_transient,
    timeout_seconds=120,
)
def checkpoint_audit_chain(reason: str) -> dict[str, Any]:
    """Verify the chain and write a signed checkpoint of its head to the write-once store.

    Returns ``{"seq", "mac", "ts", "where"}``. Raises AuditKeyMissing / ConfigError when no key
    or no checkpoint store is configured, IntegrityError (nothing written) when the chain does
    not verify, ConnectorError when the store refuses; retried only on StorageUnavailable. A
    checkpoint is never undone (it is write-once); writing a second one of the same head is
    harmless.
    """
    checkpoint, where = records().checkpoint_audit(reason)
    get_run_logger().info("audit chain anchored at seq %d: %s", checkpoint.seq, where)
    return {
        "seq": checkpoint.seq,
        "mac": checkpoint.mac,
        "ts": checkpoint.ts.isoformat(),
        "where": where,
    }


def anchor_after_change(reason: str) -> dict[str, Any] | None:
    """Checkpoint the chain after a production change, from inside a flow.

    A failure to anchor is logged as an error and returned as None: the change itself already
    happened and is recorded on the chain, and un-doing it because the anchor is unreachable
    would be worse; the next scheduled ``audit-checkpoint`` (which does fail) anchors it.
    """
    try:
        return checkpoint_audit_chain(reason)
    except Exception as exc:
        get_run_logger().error("audit chain NOT anchored after %s: %s", reason, exc)
        return None
