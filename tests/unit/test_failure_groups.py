"""Identical per-host failures are said once (kmpops.plans.failures): a table of cases."""

from __future__ import annotations

import pytest

from kmpops.plans.failures import group_failures, host_ranges

HEALTH = (
    "HostDeployFailed: {h}: health check http://127.0.0.1:{p}/health failed"
    " (exit 1: unhealthy build)"
)


def fleet(n: int, prefix: str = "prd-") -> dict[str, str]:
    return {f"{prefix}{i}": HEALTH.format(h=f"{prefix}{i}", p=27500 + i) for i in range(1, n + 1)}


GROUP_CASES = [
    ("nothing failed", {}, ""),
    (
        "one host keeps its own words",
        {"prd-3": "disk full on /srv"},
        "prd-3: disk full on /srv",
    ),
    (
        "fifty hosts, one sentence, a range of names",
        fleet(50),
        "50 hosts: HostDeployFailed: health check http://<address>/health failed "
        "(exit 1: unhealthy build): prd-1…prd-50",
    ),
    (
        "two reasons: the bigger group first, the lone one in its own words",
        {**fleet(3), "prd-9": "TimeoutError: no answer within 30s"},
        "3 hosts: HostDeployFailed: health check http://<address>/health failed "
        "(exit 1: unhealthy build): prd-1…prd-3; prd-9: TimeoutError: no answer within 30s",
    ),
    (
        "pids differ, short numbers do not: one group",
        {
            "prd-1": 'prd-1: failed after 3 attempts (exit 1: {"pid": 27667})',
            "prd-2": 'prd-2: failed after 3 attempts (exit 1: {"pid": 27671})',
            "prd-3": 'prd-3: failed after 3 attempts (exit 2: {"pid": 27675})',
        },
        '2 hosts: failed after 3 attempts (exit 1: {"pid": <n>}): prd-1, prd-2; '
        'prd-3: failed after 3 attempts (exit 2: {"pid": 27675})',
    ),
    (
        "a host name inside another word is not taken out",
        {"a": "bad a-record", "b": "bad b-record"},
        "a: bad a-record; b: bad b-record",
    ),
    (
        "more distinct reasons than groups shown",
        {f"h{i}": f"reason {i}" for i in range(1, 8)},
        "h1: reason 1; h2: reason 2; h3: reason 3; h4: reason 4; h5: reason 5; "
        "and 2 other failures",
    ),
]


@pytest.mark.parametrize(
    ("failures", "expected"), [c[1:] for c in GROUP_CASES], ids=[c[0] for c in GROUP_CASES]
)
def test_group_failures(failures: dict[str, str], expected: str) -> None:
    assert group_failures(failures) == expected


def test_five_hundred_hosts_stay_one_short_line() -> None:
    text = group_failures(fleet(500))
    assert text.count("health check") == 1 and text.endswith("prd-1…prd-500")
    assert len(text) < 200


RANGE_CASES = [
    (["prd-1", "prd-2"], "prd-1, prd-2"),
    (["prd-3", "prd-1", "prd-2"], "prd-1…prd-3"),
    (["prd-1", "prd-2", "prd-3", "prd-5", "stg-1"], "prd-1…prd-3, prd-5, stg-1"),
    (["prd-10", "prd-9", "prd-11"], "prd-9…prd-11"),
    (["web-a", "web-b"], "web-a, web-b"),
    ([f"h{i}" for i in range(1, 20, 2)], "h1, h3, h5, h7, h9, h11 and 4 more"),
]


@pytest.mark.parametrize(("hosts", "expected"), RANGE_CASES)
def test_host_ranges(hosts: list[str], expected: str) -> None:
    assert host_ranges(hosts) == expected
