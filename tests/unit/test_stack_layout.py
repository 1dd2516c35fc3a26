"""The local stack's port layout: 2,000 hosts fit, the first 99 keep their ports, and a layout
that cannot be laid out is refused naming why (before anything starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmpops.stack import MAX_HOSTS, StackError, StackSpec, _ephemeral_low, _ports, host_ports

SERVICE_OFFSETS = {*range(100, 108), 200, 250, 300, 400}


def test_the_first_99_hosts_keep_their_ports() -> None:
    assert host_ports(17000, 0) == (17001, 17501)
    assert host_ports(17000, 98) == (17099, 17599)


def test_2000_hosts_get_distinct_ports_clear_of_the_services() -> None:
    ssh, web = zip(*(host_ports(0, i) for i in range(MAX_HOSTS)), strict=True)
    every = [*ssh, *web]
    assert len(set(every)) == 2 * MAX_HOSTS
    assert not set(every) & SERVICE_OFFSETS
    assert not set(every) & set(range(800, 1000))  # left to tests' own daemons
    assert max(every) == 4999


def test_a_500_host_spec_lists_every_sshd_port() -> None:
    spec = StackSpec(root=Path("/nonexistent"), port_base=19000, production_hosts=498)
    sshd = sorted(p for p, what in _ports(spec).items() if what.startswith("sshd"))
    assert len(sshd) == 500 and sshd[-1] == 19000 + 1000 + 499


def test_more_hosts_than_the_layout_holds_are_refused() -> None:
    with pytest.raises(StackError, match=r"2001 hosts do not fit.*at most 2000"):
        StackSpec(root=Path("/x"), production_hosts=1999, staging_hosts=2)


def test_ports_above_65535_are_refused_naming_the_highest() -> None:
    with pytest.raises(StackError, match=r"needs ports up to 66999, above 65535"):
        StackSpec(root=Path("/x"), port_base=62000, production_hosts=1998)


def test_a_layout_reaching_the_ephemeral_range_is_refused() -> None:
    low = _ephemeral_low()
    base = low - 1000  # 500 hosts need base + 3598
    with pytest.raises(StackError, match=r"ephemeral range .*--port-base at most"):
        StackSpec(root=Path("/x"), port_base=base, production_hosts=498)


def test_negative_host_counts_are_refused() -> None:
    with pytest.raises(StackError, match="cannot be negative"):
        StackSpec(root=Path("/x"), production_hosts=-1)
