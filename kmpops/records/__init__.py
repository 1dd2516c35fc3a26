"""The records store: audit chain, releases, approvals, change requests, backups, incidents."""

from kmpops.records.audit import ChainProblem, ChainReport, verify_chain
from kmpops.records.models import Base
from kmpops.records.repository import Records

__all__ = ["Base", "ChainProblem", "ChainReport", "Records", "verify_chain"]
