"""What become costs a deploy: the round trip of the sudo pre-check (``sudo -n -l``) that
staging adds per host, against a plain command's round trip on the same connection.

Starts a one-host sshd stack (components sshd only) under var/bench-become at --port-base
(host at base + 1), measures interleaved, prints medians and the ratio, stops the stack.
Run as root (the stack's deploy user needs it): ``.venv/bin/python bench/bench_become.py``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from kmpops import stack
from kmpops.become import check_sudo, service_become_argvs
from kmpops.config import load_config
from kmpops.connectors.ssh import SSHConnection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-base", type=int, default=33860)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    root = Path("var/bench-become")
    shutil.rmtree(root, ignore_errors=True)
    spec = stack.StackSpec(
        root=root,
        port_base=args.port_base,
        production_hosts=1,
        staging_hosts=0,
        components=("sshd",),
    )
    try:
        info = stack.up(spec)
        cfg = load_config(info.ops_yaml)
        _, host = cfg.host("prd-1")
        words = service_become_argvs(cfg.service("web"), host)
        with SSHConnection.from_host(host) as conn:
            conn.run(["true"], check=True)
            plain, checked = [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                conn.run(["true"], check=True)
                plain.append(time.perf_counter() - t)
                t = time.perf_counter()
                check_sudo(conn, host, words)
                checked.append(time.perf_counter() - t)
        p, c = statistics.median(plain), statistics.median(checked)
        print(
            f"rounds {args.rounds}: plain command {p * 1000:.1f} ms, sudo -n -l pre-check "
            f"{c * 1000:.1f} ms (x{c / p:.2f})"
        )
    finally:
        stack.down(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
