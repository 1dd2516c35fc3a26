"""Test session set-up: one local stack for the whole session, never one per test.

The stack (sshd fleet, SeaweedFS, PostgreSQL, Prometheus, a PostgreSQL-backed Prefect server) is
started lazily by the first test that asks for ``stack`` and stopped at the end of the session.
Its ports are fixed (``KMPOPS_TEST_PORT_BASE``, default 27000), so the Prefect client settings are
set before Prefect is first imported.

Under pytest-xdist (``make test`` runs ``-n 2 --dist loadfile``: whole files per worker, so a
module's fixtures stay in one process) every worker is a session of its own, with one stack of
its own: worker ``gwN`` uses port base ``KMPOPS_TEST_PORT_BASE - 1000 * N`` and the stack root
``var/test-stack-gwN`` (``gw0`` keeps the plain names). Worker bases stay below the kernel's
ephemeral range (32768+), where an outgoing connection can hold any port.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_WORKER_INDEX = int(WORKER[2:]) if WORKER.startswith("gw") and WORKER[2:].isdigit() else 0
_SUFFIX = f"-{WORKER}" if _WORKER_INDEX else ""
PORT_BASE = int(os.environ.get("KMPOPS_TEST_PORT_BASE", "27000")) - 1000 * _WORKER_INDEX
STACK_ROOT = Path(
    os.environ.get("KMPOPS_TEST_STACK_ROOT", str(REPO / "var" / "test-stack")) + _SUFFIX
).resolve()


_KEY_BLOB = re.compile(r"AAAA[0-9A-Za-z+/]{16,}={0,2}")


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Test ids without the key material generated at import: every xdist worker must collect
    the same ids (a fresh key per process would otherwise name each case differently)."""
    if isinstance(val, str) and _KEY_BLOB.search(val):
        return _KEY_BLOB.sub("<key>", val)
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Point Prefect and kmp-ops at the session stack before anything imports Prefect."""
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{PORT_BASE + 400}/api"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    prefect_home = STACK_ROOT.parent / f"test-prefect-home{_SUFFIX}"
    prefect_home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(prefect_home)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "false"
    os.environ["KMPOPS_CONFIG"] = str(STACK_ROOT / "ops.yaml")
    os.environ.setdefault("KMPOPS_ACTOR", "pytest")


@pytest.fixture(scope="session")
def stack() -> Iterator[object]:
    """The whole local stack, started once per session (fresh state), stopped at the end."""
    from kmpops import stack as local_stack

    if (STACK_ROOT / "stack.json").exists():
        local_stack.down(STACK_ROOT)
    shutil.rmtree(STACK_ROOT, ignore_errors=True)
    try:
        info = local_stack.up(
            local_stack.StackSpec(
                root=STACK_ROOT,
                port_base=PORT_BASE,
                production_hosts=4,
                staging_hosts=2,
                prefect_db="postgres",
            )
        )
    except BaseException:
        local_stack.down(STACK_ROOT)  # nothing half-started outlives the session
        raise
    try:
        yield info
    finally:
        _flush_prefect_logs()
        local_stack.down(STACK_ROOT)


def give_to_deploy_user(stack: object, *paths: Path) -> None:
    """Hand files a test planted (as root) on a host back to the stack's deploy user.

    On a real host the service tree under ``srv`` belongs to the deploy user; a test that
    plants releases or logs there as root must give them back, or the deploy user's next
    mkdir/prune in that tree fails with ``Permission denied``. Each path is created if missing
    and chowned recursively; a stack without a deploy user (not run as root) changes nothing.
    """
    name = getattr(stack, "deploy_user", "")
    if not name:
        return
    import pwd

    from kmpops.stack.deploy_user import give_to

    give_to([Path(p) for p in paths], pwd.getpwnam(name))


@pytest.fixture(autouse=True)
def _service_trees_stay_the_deploy_users(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the stack, every host's ``srv`` and ``tmp`` are the deploy
    user's again: a file one test planted as root never breaks a later test's deploy."""
    yield
    if "stack" not in request.fixturenames:
        return
    info = request.getfixturevalue("stack")
    for host in getattr(info, "hosts", []):
        root = Path(host.root)
        if root.is_dir():
            give_to_deploy_user(info, root / "srv", root / "tmp")


def _flush_prefect_logs() -> None:
    """Ship queued run logs while the stack's Prefect server is still up."""
    import sys

    if "prefect.logging.handlers" not in sys.modules:
        return
    import logging

    from prefect.logging.handlers import APILogHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                try:
                    handler.flush()
                except Exception as err:  # flushing is best effort at teardown
                    print(f"could not flush Prefect logs: {err}")


@pytest.fixture(scope="session")
def ops_config(stack: object):
    """The stack's validated ops.yaml."""
    from kmpops.config import load_config

    return load_config(Path(stack.ops_yaml))  # type: ignore[attr-defined]
