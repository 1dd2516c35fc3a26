"""The local stack's process helpers, on real processes: a daemon that dies before it listens is
reported at once; one that rewrites its own pid file while starting is not taken for dead."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kmpops.stack._proc import StackError, start_process, stop_process, wait_for_port

PORT = 21311


def test_a_daemon_that_exits_before_listening_is_reported_at_once(tmp_path: Path) -> None:
    pid_file = tmp_path / "d.pid"
    start_process(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        pid_file=pid_file,
        log_file=tmp_path / "d.log",
    )
    time.sleep(1)  # it has exited before the wait begins: still reported, not timed out
    # "exited before listening", not "did not listen ... within 20s"
    with pytest.raises(StackError, match=r"demo exited before listening on 127.0.0.1:21311"):
        wait_for_port(PORT, timeout=20, what="demo", pid_file=pid_file)


def test_a_daemon_rewriting_its_pid_file_while_starting_is_waited_for(tmp_path: Path) -> None:
    """sshd used to truncate and rewrite the pid file the launcher had written (the CI failure
    "sshd prd-3 exited before listening" with "Server listening" in its log)."""
    pid_file = tmp_path / "d.pid"
    script = (
        "import os, socket, sys, time\n"
        "pid_file = sys.argv[1]\n"
        "for _ in range(40):\n"
        "    open(pid_file, 'w').close()\n"  # truncated: a reader sees it empty
        "    time.sleep(0.01)\n"
        "    with open(pid_file, 'w') as fh: fh.write(str(os.getpid()))\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {PORT})); s.listen()\n"
        "time.sleep(60)\n"
    )
    start_process(
        [sys.executable, "-c", script, str(pid_file)],
        pid_file=pid_file,
        log_file=tmp_path / "d.log",
    )
    try:
        wait_for_port(PORT, timeout=30, what="demo", pid_file=pid_file)
    finally:
        assert stop_process(pid_file)  # the rewriting is over once it listens
