"""Approval policy: is one answer acceptable, and has a quorum been reached.

Pure code, no I/O. An answer is checked in this order, and the first failing rule refuses it:

1. the approver is in the environment's ``approvers`` list (``unknown_approver``);
2. with ``four_eyes`` on, the approver is not the person who requested the change
   (``self_approval``);
3. the approver has not already answered this request (``duplicate_approver``);
4. the approver's token matches (``bad_token``) when a token book is configured.

A refused answer does not count; the request keeps waiting for a valid one (up to
``MAX_REFUSED_ANSWERS``, after which it is rejected). A valid ``reject`` from any allowed approver
rejects the request at once (a veto). The request is approved when ``required`` distinct valid
approvals are in.

Approver tokens are never stored or compared in clear. The token book is a secrets file referenced
by ``policy.approver_tokens`` (``file:/path``, ``env:NAME`` or ``prefect:block``); its text has one
line per approver, ``name:sha256-hex`` (``name:sha256:hex`` also accepted), ``#`` comments and
blank lines ignored. ``token_digest(token)`` gives the hex for a new token. An answer's token is
hashed with sha256 and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "MAX_REFUSED_ANSWERS",
    "ApprovalAnswer",
    "ApprovalOutcome",
    "ApprovalTally",
    "TokenBook",
    "apply_answer",
    "check_answer",
    "parse_token_book",
    "required_approvals",
    "token_digest",
]

MAX_REFUSED_ANSWERS = 5

Decision = Literal["approve", "reject"]
Refusal = Literal["unknown_approver", "self_approval", "duplicate_approver", "bad_token"]

_HEX_RE = re.compile(r"[0-9a-f]{64}")


def token_digest(token: str) -> str:
    """The sha256 hex digest of an approver token, as stored in the token book."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenBook:
    """Approver name -> sha256 hex digest of that approver's token."""

    digests: Mapping[str, str] = field(default_factory=dict)

    def verify(self, approver: str, token: str) -> bool:
        """True if ``token`` is ``approver``'s token (constant-time compare)."""
        expected = self.digests.get(approver)
        if expected is None or not token:
            return False
        return hmac.compare_digest(expected, token_digest(token))


def parse_token_book(text: str) -> TokenBook:
    """Parse the token-book text (``name:hex`` lines). Raises ValueError naming the bad line
    number only — never its content, which is secret material."""
    digests: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = line.partition(":")
        digest = digest.strip().removeprefix("sha256:").lower()
        if not sep or not name.strip() or not _HEX_RE.fullmatch(digest):
            raise ValueError(f"approver token book line {number}: expected 'name:<sha256 hex>'")
        digests[name.strip()] = digest
    return TokenBook(digests)


@dataclass(frozen=True)
class ApprovalAnswer:
    """One answer to an approval request, as given in the form (token excluded from repr)."""

    decision: Decision
    approver: str
    reason: str = ""
    token: str = field(default="", repr=False)


@dataclass
class ApprovalTally:
    """The answers so far to one approval request."""

    required: int
    approved_by: list[str] = field(default_factory=list)
    rejected_by: str | None = None
    refused: list[tuple[str, Refusal]] = field(default_factory=list)

    @property
    def answered_by(self) -> set[str]:
        """Approvers whose answer counted (approvals and a veto)."""
        return set(self.approved_by) | ({self.rejected_by} if self.rejected_by else set())

    @property
    def done(self) -> bool:
        """True once approved, vetoed, or refused too often."""
        return self.approved or self.rejected

    @property
    def approved(self) -> bool:
        """True once ``required`` distinct approvers approved and nobody vetoed."""
        return self.rejected_by is None and len(self.approved_by) >= self.required

    @property
    def rejected(self) -> bool:
        """True after a valid veto or more than MAX_REFUSED_ANSWERS refused answers."""
        return self.rejected_by is not None or len(self.refused) >= MAX_REFUSED_ANSWERS


def check_answer(
    answer: ApprovalAnswer,
    *,
    approvers: Iterable[str],
    requested_by: str,
    four_eyes: bool,
    tally: ApprovalTally,
    token_book: TokenBook | None,
) -> Refusal | None:
    """Check ``answer`` against policy; None if it counts, else the refusal reason.

    Does not change ``tally``: use :func:`apply_answer` for that.
    """
    if answer.approver not in set(approvers):
        return "unknown_approver"
    if four_eyes and answer.approver == requested_by:
        return "self_approval"
    if answer.approver in tally.answered_by:
        return "duplicate_approver"
    if token_book is not None and not token_book.verify(answer.approver, answer.token):
        return "bad_token"
    return None


def apply_answer(tally: ApprovalTally, answer: ApprovalAnswer, refusal: Refusal | None) -> None:
    """Record ``answer`` (already checked, ``refusal`` from :func:`check_answer`) in ``tally``."""
    if refusal is not None:
        tally.refused.append((answer.approver, refusal))
    elif answer.decision == "reject":
        tally.rejected_by = answer.approver
    else:
        tally.approved_by.append(answer.approver)


def required_approvals(
    *, policy_quorum: int, approval_required: bool, risk_quorum: int = 0, emergency: bool = False
) -> int:
    """How many distinct approvals a change needs.

    The policy's quorum when the environment requires approval, raised to the risk quorum
    (change requests: low 0, medium 1, high 2); an emergency override of a freeze adds one.
    """
    base = policy_quorum if approval_required else 0
    needed = max(base, risk_quorum)
    return needed + 1 if emergency else needed


@dataclass(frozen=True)
class ApprovalOutcome:
    """The final result of an approval request."""

    subject: str
    status: Literal["approved", "rejected", "timed_out", "not_required"]
    approved: bool
    required: int
    approved_by: tuple[str, ...] = ()
    rejected_by: str | None = None
    refused: tuple[tuple[str, str], ...] = ()
    reason: str = ""

    def summary(self) -> str:
        """One line for logs, artifacts and exceptions (never contains tokens)."""
        who = ", ".join(self.approved_by) or "nobody"
        text = f"{self.subject}: {self.status} ({len(self.approved_by)}/{self.required}, by {who})"
        if self.rejected_by:
            text += f"; rejected by {self.rejected_by}"
        if self.reason:
            text += f" — {self.reason}"
        return text
