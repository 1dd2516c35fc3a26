"""Approval policy as case tables: who is asking, who may answer, quorum, tokens, veto,
bindings (request code, change requests), recovery of a change request whose run died."""

from __future__ import annotations

import dataclasses

import pytest

from kmpops.plans.approval import (
    MAX_REFUSED_ANSWERS,
    ApprovalAnswer,
    ApprovalTally,
    ChangeRequestFacts,
    TokenBook,
    apply_answer,
    change_request_recovery_outcome,
    change_request_refusal,
    check_answer,
    config_digest,
    parse_token_book,
    plan_digest,
    request_code,
    requester_claim_refusal,
    required_approvals,
    service_identity,
    token_digest,
)

APPROVERS = ["alice", "bob", "carol"]
PEOPLE = [*APPROVERS, "dave"]
BOOK = TokenBook({name: token_digest(f"tok-{name}") for name in PEOPLE})
CODE = request_code("run-1", plan_digest({"service": "web", "version": "2"}))


def answer(approver, decision="approve", token=None, code=CODE):
    return ApprovalAnswer(
        decision=decision,
        approver=approver,
        reason="ok",
        token=f"tok-{approver}" if token is None else token,
        request_code=code,
    )


def check(ans, *, tally, four_eyes=True, book=BOOK, code=CODE):
    return check_answer(
        ans,
        approvers=APPROVERS,
        four_eyes=four_eyes,
        tally=tally,
        token_book=book,
        expected_code=code,
    )


@pytest.mark.parametrize(
    ("ans", "four_eyes", "already", "book", "refusal"),
    [
        (answer("bob"), True, [], BOOK, None),
        (answer("mallory"), True, [], BOOK, "unknown_approver"),
        (answer("alice"), True, [], BOOK, "self_approval"),
        (answer("alice"), False, [], BOOK, None),
        (answer("bob"), True, ["bob"], BOOK, "duplicate_approver"),
        (answer("bob", token="wrong"), True, [], BOOK, "bad_token"),
        (answer("bob", token=""), True, [], BOOK, "bad_token"),
        (answer("bob", token="tok-alice"), True, [], BOOK, "bad_token"),  # someone else's
        (answer("bob", token=""), True, [], None, "no_token_book"),  # fail closed
        (answer("bob"), True, [], None, "no_token_book"),
        (answer("carol", decision="reject"), True, [], BOOK, None),
        (answer("bob", code=""), True, [], BOOK, "wrong_request"),  # no binding
        (answer("bob", code=request_code("run-2", "x")), True, [], BOOK, "wrong_request"),
        (answer("service:scheduler"), True, [], BOOK, "service_identity"),
    ],
)
def test_check_answer(ans, four_eyes, already, book, refusal):
    """The requester (alice) is authenticated; the table is about the approver's answer."""
    tally = ApprovalTally(required=2, approved_by=list(already), requester="alice")
    assert check(ans, tally=tally, four_eyes=four_eyes, book=book) == refusal


@pytest.mark.parametrize(
    ("required", "answers", "approved", "rejected"),
    [
        (1, [answer("bob")], True, False),
        (2, [answer("bob")], False, False),
        (2, [answer("bob"), answer("bob")], False, False),  # same approver twice: one vote
        (2, [answer("bob"), answer("carol")], True, False),
        (2, [answer("bob"), answer("carol", "reject")], False, True),  # veto
        (1, [answer("alice")], False, False),  # self-approval does not count
        (1, [answer("mallory")] * MAX_REFUSED_ANSWERS, False, True),  # too many refusals
    ],
)
def test_tally(required, answers, approved, rejected):
    tally = ApprovalTally(required=required, requester="alice")
    for ans in answers:
        apply_answer(tally, ans, check(ans, tally=tally))
    assert tally.approved is approved
    assert tally.rejected is rejected


@pytest.mark.parametrize(
    ("claimed", "confirmed", "ans", "refusal"),
    [
        # the requester confirms with their own token
        ("dave", None, answer("dave", "confirm"), None),
        ("", None, answer("dave", "confirm"), None),  # unnamed: whoever confirms asked
        ("dave", None, answer("alice", "confirm"), "not_requester"),  # forged requested_by
        ("dave", None, answer("dave", "confirm", token="tok-alice"), "bad_token"),
        ("dave", None, answer("dave", "confirm", code="stale"), "wrong_request"),
        ("", None, answer("mallory", "confirm", token="x"), "bad_token"),  # not in the book
        ("dave", "dave", answer("dave", "confirm"), "already_confirmed"),
        ("", None, answer("service:automation", "confirm"), "service_identity"),
        # nothing counts before the requester is authenticated
        ("dave", None, answer("bob"), "requester_unconfirmed"),
        ("", None, answer("alice"), "requester_unconfirmed"),  # empty requested_by
        ("", None, answer("bob", decision="reject"), "requester_unconfirmed"),
        # four-eyes compares the authenticated requester, not the claim
        ("", "alice", answer("alice"), "self_approval"),
        ("dave", "dave", answer("alice"), None),
        ("", "service:scheduler", answer("alice"), None),  # a scheduled run: any approver
    ],
)
def test_requester_identity(claimed, confirmed, ans, refusal):
    tally = ApprovalTally(required=1, requester=confirmed, claimed_requester=claimed)
    assert check(ans, tally=tally) == refusal


def test_confirmation_sets_the_requester_and_self_approval_is_refused():
    tally = ApprovalTally(required=1, claimed_requester="")
    for ans in (answer("alice", "confirm"), answer("alice"), answer("bob")):
        apply_answer(tally, ans, check(ans, tally=tally))
    assert tally.requester == "alice"
    assert tally.refused == [("alice", "self_approval")]
    assert tally.approved and tally.approved_by == ["bob"]


@pytest.mark.parametrize(
    ("claim", "refused"),
    [("dave", False), ("", False), ("service:scheduler", True), (" service:x", True)],
)
def test_requester_claim(claim, refused):
    assert (requester_claim_refusal(claim) is not None) is refused


def test_service_identities_never_get_a_token():
    assert service_identity("scheduler") == "service:scheduler"
    with pytest.raises(ValueError):
        service_identity("Bad Name")
    with pytest.raises(ValueError, match="line 1"):
        parse_token_book(f"service:scheduler:{token_digest('x')}\n")
    book = TokenBook({"service:scheduler": token_digest("x")})
    assert not book.verify("service:scheduler", "x")


def test_bindings_differ_per_run_and_plan():
    plan = {"service": "web", "version": "2", "hosts": ["a", "b"], "config_digest": "c1"}
    same = {"hosts": ["a", "b"], "config_digest": "c1", "version": "2", "service": "web"}
    assert plan_digest(plan) == plan_digest(same)  # order does not matter
    assert plan_digest(plan) != plan_digest({**plan, "config_digest": "c2"})
    assert plan_digest(plan) != plan_digest({**plan, "artifact_sha256": "ff"})
    digest = plan_digest(plan)
    assert request_code("run-1", digest) != request_code("run-2", digest)
    assert config_digest({"a": 1, "b": [1, 2]}) == config_digest({"b": [1, 2], "a": 1})


CR = ChangeRequestFacts(
    id=7,
    state="implementing",
    services=("web",),
    environments=("staging", "production"),
    version="2.0",
    run_id="cr-run",
    approved_by=("alice", "bob"),
    requester="dave",
    config_digest="cfg",
)
USE = {
    "service": "web",
    "version": "2.0",
    "environment": "production",
    "parent_run_id": "cr-run",
    "config_digest": "cfg",
    "needed": 2,
    "already_used": False,
}


def cr(**changes):
    return dataclasses.replace(CR, **changes)


@pytest.mark.parametrize(
    ("facts", "use", "fragment"),
    [
        (CR, {}, None),
        (CR, {"service": "other"}, "covers web, not other"),
        (CR, {"version": "9"}, "for version 2.0, not 9"),
        (CR, {"environment": "dev"}, "not dev"),
        (CR, {"parent_run_id": None}, "its own change-request run"),
        (CR, {"parent_run_id": "another-run"}, "its own change-request run"),
        (CR, {"config_digest": "edited"}, "another config"),
        (CR, {"already_used": True}, "already used"),
        (CR, {"needed": 3}, "2 approval(s), 3 needed"),
        (cr(state="closed"), {}, "is closed"),
        (cr(state="requested"), {}, "not approved"),
        (cr(requester=None), {}, "no authenticated requester"),
        # the requester's own approval (were it recorded) never counts towards the quorum
        (cr(approved_by=("dave", "bob")), {}, "1 approval(s)"),
    ],
)
def test_change_request_binding(facts, use, fragment):
    why = change_request_refusal(facts, **{**USE, **use})
    if fragment is None:
        assert why is None
    else:
        assert why is not None and fragment in why


@pytest.mark.parametrize(
    ("services", "ends", "outcome"),
    [
        (["web"], {"web": "completed"}, "implemented"),
        (["web", "api"], {"web": "completed", "api": "completed"}, "implemented"),
        (["web"], {}, "rolled_back"),  # never started: nothing of it is live
        (["web"], {"web": "rolled_back"}, "rolled_back"),
        (["web", "api"], {"web": "rolled_back"}, "rolled_back"),
        (["web"], {"web": "unfinished"}, "failed"),
        (["web", "api"], {"web": "completed"}, "failed"),  # half the change is live
    ],
)
def test_change_request_recovery(services, ends, outcome):
    assert change_request_recovery_outcome(services, ends) == outcome


@pytest.mark.parametrize(
    ("quorum", "required_flag", "risk", "emergency", "expected"),
    [
        (1, True, 0, False, 1),
        (1, False, 0, False, 0),
        (2, True, 1, False, 2),
        (1, False, 2, False, 2),
        (1, True, 0, True, 2),
        (1, False, 0, True, 1),
    ],
)
def test_required_approvals(quorum, required_flag, risk, emergency, expected):
    assert (
        required_approvals(
            policy_quorum=quorum,
            approval_required=required_flag,
            risk_quorum=risk,
            emergency=emergency,
        )
        == expected
    )


def test_token_book_parse_and_never_echo():
    digest = token_digest("s3cret")
    book = parse_token_book(f"# approvers\n\nalice:{digest}\nbob:sha256:{digest.upper()}\n")
    assert book.verify("alice", "s3cret") and book.verify("bob", "s3cret")
    assert not book.verify("alice", "nope") and not book.verify("carol", "s3cret")
    with pytest.raises(ValueError) as err:
        parse_token_book("alice:plaintext-token-value")
    assert "plaintext-token-value" not in str(err.value) and "line 1" in str(err.value)
    assert "tok-bob" not in repr(answer("bob"))
