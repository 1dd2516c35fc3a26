"""A stack past the first layout: 120 hosts, the ones beyond 99 on the growth ports, every
daemon reachable with its host key checked."""

from __future__ import annotations

from pathlib import Path

from kmpops import stack
from kmpops.config import load_config
from kmpops.connectors.ssh import SSHConnection

PORT_BASE = 21500  # sshd 21501-21599 and 22599-22619; nothing else of the suite is there


def test_a_120_host_stack_reaches_its_last_host(tmp_path: Path) -> None:
    root = tmp_path / "grown"
    info = stack.up(
        stack.StackSpec(
            root=root,
            port_base=PORT_BASE,
            production_hosts=118,
            components=("sshd",),
            deploy_user=None,
        )
    )
    try:
        last = info.host("prd-118")
        assert (last.port, last.web_port) == (PORT_BASE + 1000 + 119, PORT_BASE + 3000 + 119)
        assert len(Path(info.known_hosts).read_text().splitlines()) == 120
        cfg = load_config(info.ops_yaml)
        for name in ("stg-1", "prd-97", "prd-98", "prd-118"):
            _env, host = cfg.host(name)
            with SSHConnection.from_host(host) as conn:
                assert conn.run('printf %s "$KMPOPS_HOST"').stdout == name
        alive = stack.status(root)
        assert len(alive) == 120 and all(alive.values())
    finally:
        stack.down(root)
    assert not any(stack.status(root).values())
