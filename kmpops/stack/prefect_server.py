"""A Prefect server for the local stack (``prefect server start`` as a detached process).

This module only *runs* the ``prefect`` executable; it does not import Prefect (layer rule).
Analytics are off; the API and UI listen on 127.0.0.1 only. With ``database_url`` the server uses
PostgreSQL (``postgresql+asyncpg://…``, recommended for concurrent runs); without it, SQLite under
``root/prefect``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kmpops.stack._proc import StackError, read_pid, start_process, stop_process

__all__ = ["PrefectInfo", "find_prefect", "server_env", "start", "stop"]

_HOST = "127.0.0.1"


@dataclass(frozen=True)
class PrefectInfo:
    """Where the Prefect API and UI answer."""

    api_url: str
    ui_url: str
    pid_file: Path


def find_prefect() -> Path:
    """The ``prefect`` executable next to the running interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / "prefect"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("prefect")
    if found:
        return Path(found)
    raise StackError("the 'prefect' executable was not found")


def _paths(root: Path) -> tuple[Path, Path, Path]:
    home = Path(root).resolve() / "prefect"
    return home, home / "server.pid", home / "server.log"


def server_env(root: Path, port: int, *, database_url: str | None = None) -> dict[str, str]:
    """The environment the server runs with (also useful to point clients at it)."""
    home, _, _ = _paths(root)
    api_url = f"http://{_HOST}:{port}/api"
    db_url = database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_UI_URL": f"http://{_HOST}:{port}",
        "PREFECT_SERVER_API_HOST": _HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": db_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:  # noqa: S310 (loopback http)
            return resp.status == 200 and json.loads(resp.read() or b"false") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start(
    root: Path, port: int, *, database_url: str | None = None, timeout: float = 120.0
) -> PrefectInfo:
    """Start a Prefect server on ``127.0.0.1:port``; wait until ``/api/health`` answers true.

    Idempotent: a running server (per the pid file) is reused. Raises StackError with the path of
    the server log if it exits or does not become healthy within ``timeout`` seconds.
    """
    home, pid_file, log_file = _paths(root)
    home.mkdir(parents=True, exist_ok=True)
    env = server_env(root, port, database_url=database_url)
    info = PrefectInfo(
        api_url=env["PREFECT_API_URL"], ui_url=env["PREFECT_UI_URL"], pid_file=pid_file
    )
    if read_pid(pid_file) is None:
        argv = [str(find_prefect()), "server", "start", "--host", _HOST, "--port", str(port)]
        argv.append("--analytics-off")
        start_process(argv, pid_file=pid_file, log_file=log_file, env=env, cwd=home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(info.api_url):
            return info
        if read_pid(pid_file) is None:
            raise StackError(f"the Prefect server exited during start-up; see {log_file}")
        time.sleep(0.25)
    raise StackError(f"the Prefect server was not healthy within {timeout:.0f}s; see {log_file}")


def stop(root: Path) -> None:
    """Stop the Prefect server started under ``root`` (by pid file); its database is kept."""
    _, pid_file, _ = _paths(root)
    stop_process(pid_file, timeout=15.0)
