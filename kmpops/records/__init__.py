"""The records store: audit chain, releases, approvals, change requests, backups, incidents."""

from kmpops.records.audit import (
    AuditKey,
    AuditKeyMissing,
    ChainProblem,
    ChainReport,
    Checkpoint,
    verify_chain,
)
from kmpops.records.models import Base
from kmpops.records.repository import Records

__all__ = [
    "AuditKey",
    "AuditKeyMissing",
    "Base",
    "ChainProblem",
    "ChainReport",
    "Checkpoint",
    "Records",
    "verify_chain",
]
