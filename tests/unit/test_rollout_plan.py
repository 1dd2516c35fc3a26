"""Rollout plans as case tables: batch sizes, batching, stop rule."""

import pytest

from kmpops.plans.rollout import batch_count, plan_rollout, rollout_must_stop

HOSTS = [f"h{i}" for i in range(1, 11)]


@pytest.mark.parametrize(
    ("batch_size", "hosts", "expected"),
    [
        ("25%", 4, 1),
        ("25%", 10, 3),  # 2.5 rounds up
        ("50%", 4, 2),
        ("100%", 7, 7),
        ("1%", 3, 1),  # at least one host
        ("33.3333333333%", 3, 1),
        ("10%", 50, 5),
        (2, 10, 2),
        (20, 4, 4),  # capped at host count
        ("3", 10, 3),
    ],
)
def test_batch_count(batch_size, hosts, expected):
    assert batch_count(batch_size, hosts) == expected


@pytest.mark.parametrize("bad", [0, -1, "0%", "101%", "abc", "25", True, "", "%"])
def test_batch_count_refuses(bad):
    if bad == "25":
        assert batch_count(bad, 4) == 4
        return
    with pytest.raises(ValueError):
        batch_count(bad, 4)


@pytest.mark.parametrize(
    ("hosts", "batch_size", "batches"),
    [
        (HOSTS[:4], "25%", [["h1"], ["h2"], ["h3"], ["h4"]]),
        (HOSTS[:4], "50%", [["h1", "h2"], ["h3", "h4"]]),
        (HOSTS[:5], 2, [["h1", "h2"], ["h3", "h4"], ["h5"]]),
        (HOSTS[:3], "100%", [["h1", "h2", "h3"]]),
        (["only"], "25%", [["only"]]),
    ],
)
def test_plan_batches(hosts, batch_size, batches):
    plan = plan_rollout(
        hosts, service="web", version="1.0", environment="production", batch_size=batch_size
    )
    assert [list(b) for b in plan.batches] == batches
    assert list(plan.hosts) == hosts


def test_plan_refuses_empty_and_duplicates():
    with pytest.raises(ValueError, match="at least one host"):
        plan_rollout([], service="web", version="1", environment="p")
    with pytest.raises(ValueError, match="duplicate hosts in rollout: a"):
        plan_rollout(["a", "b", "a"], service="web", version="1", environment="p")
    with pytest.raises(ValueError, match="max_failures"):
        plan_rollout(["a"], service="web", version="1", environment="p", max_failures=-1)


def test_plan_markdown_names_hosts_and_previous():
    plan = plan_rollout(
        ["a", "b"],
        service="web",
        version="2.0",
        environment="production",
        batch_size=1,
        previous={"a": "1.0", "b": None},
    )
    text = plan.to_markdown()
    assert "`web` `2.0`" in text
    assert "| 1 | a | 1.0 |" in text
    assert "| 2 | b | (first install) |" in text


@pytest.mark.parametrize(
    ("failures", "max_failures", "stop"),
    [(0, 0, False), (1, 0, True), (1, 1, False), (2, 1, True), (3, 5, False)],
)
def test_rollout_must_stop(failures, max_failures, stop):
    assert rollout_must_stop(failures, max_failures) is stop
