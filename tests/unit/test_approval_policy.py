"""Approval policy as case tables: who may answer, quorum, tokens, veto."""

import pytest

from kmpops.plans.approval import (
    MAX_REFUSED_ANSWERS,
    ApprovalAnswer,
    ApprovalTally,
    TokenBook,
    apply_answer,
    check_answer,
    parse_token_book,
    required_approvals,
    token_digest,
)

APPROVERS = ["alice", "bob", "carol"]
BOOK = TokenBook({name: token_digest(f"tok-{name}") for name in APPROVERS})


def answer(approver, decision="approve", token=None):
    return ApprovalAnswer(
        decision=decision,
        approver=approver,
        reason="ok",
        token=f"tok-{approver}" if token is None else token,
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
        (answer("bob", token=""), True, [], None, None),  # no token book configured
        (answer("carol", decision="reject"), True, [], BOOK, None),
    ],
)
def test_check_answer(ans, four_eyes, already, book, refusal):
    tally = ApprovalTally(required=2, approved_by=list(already))
    got = check_answer(
        ans,
        approvers=APPROVERS,
        requested_by="alice",
        four_eyes=four_eyes,
        tally=tally,
        token_book=book,
    )
    assert got == refusal


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
    tally = ApprovalTally(required=required)
    for ans in answers:
        refusal = check_answer(
            ans,
            approvers=APPROVERS,
            requested_by="alice",
            four_eyes=True,
            tally=tally,
            token_book=BOOK,
        )
        apply_answer(tally, ans, refusal)
    assert tally.approved is approved
    assert tally.rejected is rejected


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
