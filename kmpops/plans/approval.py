"""Approval policy: who is asking, is one answer acceptable, and has a quorum been reached.

Pure code, no I/O. Identities are authenticated, never taken from a free-text field: a person is
whoever presents their own token from the token book; a scheduled or automation-triggered run
acts as a *service identity* (``service:scheduler``, ``service:automation``, ...) that is never in
the token book and can never approve. Before any approval counts, the requester of the change is
authenticated: either the run was started by a service identity, or the requester answers the
request with ``decision: confirm`` and their own token (the first answer the request waits for).

Every answer carries the request code (:func:`request_code`) of the request it answers: a digest
of the run id and the plan digest (:func:`plan_digest` — what changes where, the artifact's source
and sha256, the config digest). An answer made for another run or another plan is refused, so a
captured answer cannot be replayed elsewhere.

An answer is checked in this order, and the first failing rule refuses it:

0. a token book is configured (``no_token_book``: without one nothing can be authenticated and
   every answer is refused — fail closed);
1. the answer carries this request's code (``wrong_request``);
2. the answerer is not a service identity (``service_identity``);
3. for ``confirm``: nobody has confirmed yet (``already_confirmed``), the answerer is the named
   requester if one was named (``not_requester``), the token matches (``bad_token``);
4. for ``approve``/``reject``: the approver is in the environment's ``approvers`` list
   (``unknown_approver``); the requester has been authenticated (``requester_unconfirmed``);
   with ``four_eyes`` on, the approver is not the authenticated requester (``self_approval``);
   the approver has not already answered this request (``duplicate_approver``); the approver's
   token matches (``bad_token``).

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
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "MAX_REFUSED_ANSWERS",
    "SERVICE_PREFIX",
    "ApprovalAnswer",
    "ApprovalOutcome",
    "ApprovalTally",
    "ChangeRequestFacts",
    "TokenBook",
    "apply_answer",
    "change_request_recovery_outcome",
    "change_request_refusal",
    "check_answer",
    "config_digest",
    "is_service_identity",
    "parse_token_book",
    "plan_digest",
    "request_code",
    "requester_claim_refusal",
    "required_approvals",
    "service_identity",
    "token_digest",
]

MAX_REFUSED_ANSWERS = 5

Decision = Literal["approve", "reject", "confirm"]
Refusal = Literal[
    "no_token_book",
    "wrong_request",
    "service_identity",
    "already_confirmed",
    "not_requester",
    "unknown_approver",
    "requester_unconfirmed",
    "self_approval",
    "duplicate_approver",
    "bad_token",
    "answer_not_removed",
]

SERVICE_PREFIX = "service:"

_HEX_RE = re.compile(r"[0-9a-f]{64}")
_SERVICE_RE = re.compile(r"service:[a-z][a-z0-9-]{0,40}")


def service_identity(name: str) -> str:
    """The service identity ``service:<name>`` (a scheduler, an automation, a procedure).

    Raises ValueError for a name that is not lowercase letters, digits and dashes."""
    identity = f"{SERVICE_PREFIX}{name}"
    if not _SERVICE_RE.fullmatch(identity):
        raise ValueError(f"{name!r} is not a service identity name")
    return identity


def is_service_identity(name: str) -> bool:
    """True for ``service:...`` names: they act on their own and can never approve."""
    return name.startswith(SERVICE_PREFIX)


def requester_claim_refusal(claim: str) -> str | None:
    """Why a ``requested_by`` parameter cannot be accepted as a claim, or None.

    A parameter may name the person who will confirm the request (or be empty: whoever confirms
    with their token is the requester); it may never claim a service identity — those come from
    the run's provenance, not from a form."""
    if is_service_identity(claim.strip()):
        return f"requested_by {claim!r}: service identities come from the run, not a parameter"
    return None


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_digest(config_data: Mapping[str, object]) -> str:
    """sha256 of the validated config (its JSON dump, keys sorted; secret values are masked
    by the dump, so the digest never depends on — or reveals — a secret)."""
    return hashlib.sha256(_canonical(config_data)).hexdigest()


def plan_digest(facts: Mapping[str, object]) -> str:
    """sha256 of what an approval is asked for: subject, what changes where (service, version,
    environment, hosts), the artifact's source and sha256, the config digest, the plan text."""
    return hashlib.sha256(_canonical(facts)).hexdigest()


def request_code(run_id: str | None, digest: str) -> str:
    """The code an answer must carry: binds it to one run and one plan digest."""
    return hashlib.sha256(f"{run_id or '-'}:{digest}".encode()).hexdigest()[:16]


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
        if expected is None or not token or is_service_identity(approver):
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
        if is_service_identity(name.strip()):
            raise ValueError(f"approver token book line {number}: service identities get no token")
        digests[name.strip()] = digest
    return TokenBook(digests)


@dataclass(frozen=True)
class ApprovalAnswer:
    """One answer to an approval request, as given in the form (token excluded from repr)."""

    decision: Decision
    approver: str
    reason: str = ""
    token: str = field(default="", repr=False)
    request_code: str = ""


@dataclass
class ApprovalTally:
    """The answers so far to one approval request."""

    required: int
    approved_by: list[str] = field(default_factory=list)
    rejected_by: str | None = None
    refused: list[tuple[str, Refusal]] = field(default_factory=list)
    #: who asked, once authenticated (a confirmed person or the run's service identity)
    requester: str | None = None
    #: the name the request was filed under, "" for "whoever confirms"
    claimed_requester: str = ""

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
    four_eyes: bool,
    tally: ApprovalTally,
    token_book: TokenBook | None,
    expected_code: str,
) -> Refusal | None:
    """Check ``answer`` against policy; None if it counts, else the refusal reason.

    ``tally.requester`` is the authenticated requester (None until confirmed),
    ``tally.claimed_requester`` the name the request was filed under. Does not change ``tally``:
    use :func:`apply_answer` for that.
    """
    if token_book is None:
        return "no_token_book"
    if not expected_code or not hmac.compare_digest(answer.request_code, expected_code):
        return "wrong_request"
    if is_service_identity(answer.approver):
        return "service_identity"
    if answer.decision == "confirm":
        if tally.requester is not None:
            return "already_confirmed"
        if tally.claimed_requester and answer.approver != tally.claimed_requester:
            return "not_requester"
        if not token_book.verify(answer.approver, answer.token):
            return "bad_token"
        return None
    if answer.approver not in set(approvers):
        return "unknown_approver"
    if tally.requester is None:
        return "requester_unconfirmed"
    if four_eyes and answer.approver == tally.requester:
        return "self_approval"
    if answer.approver in tally.answered_by:
        return "duplicate_approver"
    if not token_book.verify(answer.approver, answer.token):
        return "bad_token"
    return None


def apply_answer(tally: ApprovalTally, answer: ApprovalAnswer, refusal: Refusal | None) -> None:
    """Record ``answer`` (already checked, ``refusal`` from :func:`check_answer`) in ``tally``."""
    if refusal is not None:
        tally.refused.append((answer.approver, refusal))
    elif answer.decision == "confirm":
        tally.requester = answer.approver
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
    requester: str | None = None
    plan_digest: str = ""

    def summary(self) -> str:
        """One line for logs, artifacts and exceptions (never contains tokens)."""
        who = ", ".join(self.approved_by) or "nobody"
        text = f"{self.subject}: {self.status} ({len(self.approved_by)}/{self.required}, by {who})"
        if self.rejected_by:
            text += f"; rejected by {self.rejected_by}"
        if self.reason:
            text += f" — {self.reason}"
        return text


@dataclass(frozen=True)
class ChangeRequestFacts:
    """What the records say about one change request, for :func:`change_request_refusal`."""

    id: int
    state: str
    services: tuple[str, ...]
    environments: tuple[str, ...]
    version: str
    run_id: str | None
    approved_by: tuple[str, ...]
    requester: str | None
    config_digest: str | None


def change_request_refusal(
    cr: ChangeRequestFacts,
    *,
    service: str,
    version: str,
    environment: str,
    parent_run_id: str | None,
    config_digest: str,
    needed: int,
    already_used: bool,
) -> str | None:
    """Why a deploy may not use change request ``cr`` in place of its own approval, or None.

    The deploy must be what the change request names (its service, version, environment), be
    started by the change request's own run (``parent_run_id``), run on the config the change
    was approved on, and be the first use of the change for that service and environment
    (``already_used``: the consumption record exists). The change must be approved (state
    ``approved`` or ``implementing``) by ``needed`` distinct approvers other than its
    authenticated requester.
    """
    tag = f"change request #{cr.id}"
    if cr.state not in ("approved", "implementing"):
        return f"{tag} is {cr.state}, not approved"
    if service not in cr.services:
        return f"{tag} covers {', '.join(cr.services)}, not {service}"
    if version != cr.version:
        return f"{tag} is for version {cr.version}, not {version}"
    if environment not in cr.environments:
        return f"{tag} covers {', '.join(cr.environments)}, not {environment}"
    if not cr.run_id or parent_run_id != cr.run_id:
        return f"{tag} can only be implemented by its own change-request run"
    if cr.requester is None:
        return f"{tag} has no authenticated requester"
    if cr.config_digest != config_digest:
        return f"{tag} was approved on another config (re-plan and re-approve)"
    approvers = set(cr.approved_by) - {cr.requester}
    if len(approvers) < needed:
        return f"{tag} has {len(approvers)} approval(s), {needed} needed"
    if already_used:
        return f"{tag} was already used for {service} in {environment}"
    return None


DeployEnd = Literal["completed", "rolled_back", "unfinished", "not_started"]


def change_request_recovery_outcome(
    services: Iterable[str], deploy_ends: Mapping[str, DeployEnd]
) -> Literal["implemented", "rolled_back", "failed"]:
    """How a change request whose run died ends, from how its deploys ended (per service;
    a service missing from ``deploy_ends`` was never started).

    Every service completed: ``implemented``. None completed and none left unfinished (each
    rolled back or never started): ``rolled_back`` — nothing of the change is live. Anything
    else (a deploy still half-done, or some services on the new version and others not):
    ``failed`` — a human must look (deploy-recover rolls a crashed deploy back)."""
    ends = [deploy_ends.get(s, "not_started") for s in services]
    if ends and all(e == "completed" for e in ends):
        return "implemented"
    if all(e in ("rolled_back", "not_started") for e in ends):
        return "rolled_back"
    return "failed"
