"""``audit-checkpoint``: anchor the audit chain's head in write-once storage, on a schedule.

The chain head (seq, HMAC tag, time), signed with ``records.audit_key``, goes to the
configured checkpoint store (S3 Object Lock in COMPLIANCE mode, or the append-only local file of
the embedded default). ``kmpops audit verify`` later reports a chain shorter than a checkpoint
(truncation) or different from it (rewrite). The run fails when the chain does not verify (it is
not anchored then) or the store refuses.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.audit import checkpoint_audit_chain

__all__ = ["audit_checkpoint"]


@flow(name="audit-checkpoint")
def audit_checkpoint(reason: str = "scheduled") -> dict[str, Any]:
    """Verify the audit chain and write one signed checkpoint of its head; return it."""
    return checkpoint_audit_chain(f"audit-checkpoint: {reason}"[:200])
