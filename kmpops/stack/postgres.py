"""A private PostgreSQL 15 cluster for the local stack, listening on 127.0.0.1 only.

PostgreSQL refuses to run as root, so when we are root the cluster runs as the ``postgres``
system user that the Debian package created (no user is created here). Its files (data, socket
directory, log) live in ``root/postgres`` when that user can reach it; when it cannot — the
checkout sits under a directory other users may not traverse, such as root's mode-700 home —
they live in ``/var/lib/kmpops/pg-<digest of root>`` instead, and ``root/postgres/cluster-dir``
names that place. The permissions of the user's own directories are never changed. The pid file
always stays in ``root/postgres``. Authentication is ``trust`` for 127.0.0.1 and for the unix
socket, whose directory is the cluster's ``run/`` (not /var/run). For speed this is a *test*
cluster: ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are off — a crash of the
machine can lose it; never point it at data you care about.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from kmpops.stack._proc import StackError, pid_alive, read_pid, stop_process, wait_for_port

__all__ = ["PGInfo", "find_bin_dir", "start", "stop"]

_HOST = "127.0.0.1"
_SUPERUSER = "postgres"
_RUN_AS = "postgres"
_DATABASE = "kmpops"


@dataclass(frozen=True)
class PGInfo:
    """Where the cluster listens and where its files are."""

    host: str
    port: int
    user: str
    bin_dir: Path
    data_dir: Path
    pid_file: Path

    def dsn(self, dbname: str = _DATABASE) -> str:
        """A libpq URL for ``dbname`` (trust auth, so no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def sqlalchemy_url(self, dbname: str = _DATABASE, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL for ``dbname`` using ``driver`` (psycopg, asyncpg, ...)."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{dbname}"


def find_bin_dir() -> Path:
    """The PostgreSQL 15 binaries: /usr/lib/postgresql/15/bin, else wherever ``pg_ctl`` is on PATH.

    Raises StackError if neither exists.
    """
    debian = Path("/usr/lib/postgresql/15/bin")
    if (debian / "pg_ctl").is_file():
        return debian
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise StackError("PostgreSQL binaries (pg_ctl) not found; install postgresql-15")


EXTERNAL_HOME = Path("/var/lib/kmpops")


def _layout(root: Path) -> dict[str, Path]:
    base = Path(root).resolve() / "postgres"
    home = base
    pointer = base / "cluster-dir"
    with contextlib.suppress(OSError):
        home = Path(pointer.read_text().strip())
    return {
        "base": base,
        "home": home,
        "pointer": pointer,
        "data": home / "data",
        "run": home / "run",
        "log": home / "postgres.log",
        "pid": base / "postgres.pid",
    }


def _traversable(path: Path, ids: tuple[int, int]) -> bool:
    """True if the user ``ids`` can reach ``path``: every directory on the way lets it search."""
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == ids[0]:
            if not st.st_mode & 0o100:
                return False
        elif st.st_gid == ids[1]:
            if not st.st_mode & 0o010:
                return False
        elif not st.st_mode & 0o001:
            return False
    return True


def _place_cluster(root: Path, ids: tuple[int, int] | None) -> dict[str, Path]:
    """Decide where the cluster's files live (see the module docstring) and create that place.

    A fresh stack root (no ``cluster-dir`` pointer yet) gets a fresh external place: whatever an
    earlier stack of the same root left there is removed, as ``rm -rf root`` would have done.
    """
    paths = _layout(root)
    paths["base"].mkdir(parents=True, exist_ok=True)
    if ids is None or _traversable(paths["base"], ids):
        return paths
    if not paths["pointer"].exists():
        digest = hashlib.sha256(str(paths["base"]).encode()).hexdigest()[:16]
        home = EXTERNAL_HOME / f"pg-{digest}"
        EXTERNAL_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not _traversable(EXTERNAL_HOME, ids):
            raise StackError(
                f"the postgres system user cannot reach {paths['base']} nor {EXTERNAL_HOME}; "
                "make one of them traversable for it"
            )
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(mode=0o700)
        paths["pointer"].write_text(f"{home}\n")
        paths = _layout(root)
    paths["home"].mkdir(mode=0o700, exist_ok=True)
    return paths


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: the ``postgres`` user when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_RUN_AS)
    except KeyError as exc:
        raise StackError(
            "running as root, and there is no 'postgres' system user to run PostgreSQL as"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def _run(
    argv: list[str], *, ids: tuple[int, int] | None, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    if env:
        full_env.update(env)
    kwargs: dict[str, object] = {}
    if ids is not None:
        kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
    return subprocess.run(
        argv,
        cwd=str(cwd),
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        **kwargs,  # type: ignore[arg-type]
    )


def _chown_tree(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, *ids)
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(dirpath, name), *ids, follow_symlinks=False)


def _configure(data: Path, run: Path, port: int) -> None:
    conf = data / "postgresql.conf"
    text = conf.read_text()
    marker = "# --- kmp-ops local stack ---"
    if marker in text:
        text = text[: text.index(marker)]
    text += (
        f"{marker}\n"
        f"listen_addresses = '{_HOST}'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{run}'\n"
        "fsync = off\n"
        "synchronous_commit = off\n"
        "full_page_writes = off\n"
        "max_connections = 200\n"
        "logging_collector = off\n"
    )
    conf.write_text(text)
    (data / "pg_hba.conf").write_text(
        "# kmp-ops local stack: trust on the private socket and 127.0.0.1 only\n"
        "local all all trust\n"
        f"host all all {_HOST}/32 trust\n"
    )


def start(root: Path, port: int, *, timeout: float = 60.0) -> PGInfo:
    """Start (initdb on first use) a PostgreSQL 15 cluster under ``root/postgres`` on ``port``.

    Idempotent: a running cluster is reused. Ensures the ``kmpops`` database exists. Raises
    StackError (with the tail of the server log) if initdb or the server fails.
    """
    paths = _layout(root)
    bin_dir = find_bin_dir()
    ids = _run_as()
    info = PGInfo(
        host=_HOST,
        port=port,
        user=_SUPERUSER,
        bin_dir=bin_dir,
        data_dir=paths["data"],
        pid_file=paths["pid"],
    )
    if read_pid(paths["pid"]) is None:
        paths = _place_cluster(root, ids)
        info = replace(info, data_dir=paths["data"])
        paths["run"].mkdir(exist_ok=True)
        _chown_tree(paths["home"], ids)
        if not (paths["data"] / "PG_VERSION").exists():
            if paths["data"].exists():
                shutil.rmtree(paths["data"])  # a half-done initdb from an interrupted start
            result = _run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(paths["data"]),
                    "-U",
                    _SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                ids=ids,
                cwd=paths["home"],
            )
            if result.returncode != 0:
                raise StackError(f"initdb failed: {result.stderr.strip()[-800:]}")
        _configure(paths["data"], paths["run"], port)
        _chown_tree(paths["data"], ids)
        result = _run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(paths["data"]),
                "-l",
                str(paths["log"]),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            ids=ids,
            cwd=paths["home"],
        )
        if result.returncode != 0:
            raise StackError(f"PostgreSQL did not start: {_log_tail(paths['log'])}")
        _write_pid_file(paths["data"], paths["pid"])
    wait_for_port(port, timeout=timeout, what="PostgreSQL", pid_file=paths["pid"])
    _ensure_database(info, _DATABASE, timeout)
    return info


def _write_pid_file(data: Path, pid_file: Path) -> None:
    """Copy the postmaster pid (first line of postmaster.pid) into our one-number pid file."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            if pid_alive(pid):
                pid_file.write_text(f"{pid}\n")
                return
        time.sleep(0.05)
    raise StackError("PostgreSQL started but wrote no postmaster.pid")


def _log_tail(log: Path, chars: int = 800) -> str:
    try:
        return log.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return "(no log)"


def _ensure_database(info: PGInfo, name: str, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(info.dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return
        except psycopg.OperationalError as exc:  # "the database system is starting up"
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL on port {info.port} refused connections") from exc
            time.sleep(0.1)


def stop(root: Path) -> None:
    """Stop the cluster under ``root`` (``pg_ctl stop -m fast``, then by pid file); data is kept."""
    paths = _layout(root)
    pid = read_pid(paths["pid"])
    if pid is None:
        paths["pid"].unlink(missing_ok=True)
        return
    with contextlib.suppress(StackError, subprocess.TimeoutExpired, OSError):
        _run(
            [str(find_bin_dir() / "pg_ctl"), "-D", str(paths["data"]), "-m", "fast", "-w", "stop"],
            ids=_run_as(),
            cwd=paths["home"],
        )
    stop_process(paths["pid"], timeout=10.0)


def remove(root: Path) -> None:
    """Stop the cluster under ``root`` and delete its files, wherever they live (see the module
    docstring): what ``rm -rf root`` alone would leave in /var/lib/kmpops goes too."""
    stop(root)
    paths = _layout(root)
    if paths["home"] != paths["base"] and paths["home"].parent == EXTERNAL_HOME:
        shutil.rmtree(paths["home"], ignore_errors=True)
    shutil.rmtree(paths["base"], ignore_errors=True)
