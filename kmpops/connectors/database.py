"""Databases kmp-ops backs up and restores: PostgreSQL (pg_dump/pg_restore, psycopg) and SQLite.

PostgreSQL dumps stream: ``pg_dump -Fc`` writes to a pipe that is read straight into an object
store, no temporary file. A password reaches the tools through a passfile (``PGPASSFILE``,
mode 0600 in a private directory, removed when the tool has exited), never their argv or their
environment (``/proc/<pid>/environ`` is readable by the same user), and never appears in an
exception. Database, user and host names are validated before they reach a command line (they
are passed as argv words, no shell).

Every wait is bounded: connections by ``connect_timeout``; each SQL statement of kmp-ops by
``statement_timeout`` and each lock wait by ``lock_timeout`` (both set on the session);
``pg_dump`` by ``--lock-wait-timeout`` for its table locks; and the whole run of ``pg_dump`` /
``pg_restore`` by ``tool_timeout`` (the process is killed). A timeout fails with a message
naming the server, the database and what was waited for.

Errors: UnsafeValueError for a bad name; HostUnreachable when the server cannot be reached;
AuthenticationFailed when it refuses the credentials; CommandFailed (a ConnectorError) when
pg_dump / pg_restore exit non-zero (the message holds the tail of their stderr); ConnectorError
for other refusals (all from :mod:`kmpops.errors`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from pydantic import SecretStr

from kmpops.errors import (
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    ConnectorError,
    HostUnreachable,
    UnsafeValueError,
)

if TYPE_CHECKING:
    from kmpops.connectors.storage import ObjectStore, PutResult

__all__ = ["PostgresDatabase", "SQLiteDatabase", "SnapshotDump"]

Compression = Literal["none", "zstd"]
_CHUNK = 1024 * 1024
_STDERR_TAIL = 2000
_PG_MAX_IDENT = 63  # NAMEDATALEN - 1: the server truncates longer identifiers

try:
    from kmpops.shellsafe import validate_name as _validate_name
except ImportError:  # pragma: no cover - shellsafe is part of the tree; this is a fallback
    _NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

    def _validate_name(value: str, *, what: str) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise UnsafeValueError(f"{what}: {value!r} is not a safe name")
        return value


_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[?[0-9A-Fa-f:]+\]?|/[A-Za-z0-9._/-]+")


def _validate_host(host: str) -> str:
    if not isinstance(host, str) or not _HOST.fullmatch(host) or ".." in host:
        raise UnsafeValueError(f"database host: {host!r} is not a host name, address or socket dir")
    return host


def _find_bin_dir() -> Path:
    for candidate in (Path("/usr/lib/postgresql/15/bin"),):
        if (candidate / "pg_dump").is_file():
            return candidate
    found = shutil.which("pg_dump")
    if found:
        return Path(found).parent
    raise ConnectorError("pg_dump not found: install the PostgreSQL client tools or set bin_dir")


@dataclass(frozen=True)
class SnapshotDump:
    """A dump and the exact row counts of every user table, taken in the same snapshot."""

    put: PutResult
    row_counts: dict[str, int]
    snapshot_id: str
    server_version: str


class _StderrTail:
    """Drain a pipe in a thread, keeping the last few KB (so the child never blocks on it)."""

    def __init__(self, pipe: BinaryIO) -> None:
        self._chunks: collections.deque[bytes] = collections.deque(maxlen=64)
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self._thread.start()

    def _drain(self, pipe: BinaryIO) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := pipe.read1(4096) if hasattr(pipe, "read1") else pipe.read(4096):
                self._chunks.append(chunk)

    def text(self) -> str:
        self._thread.join(timeout=5)
        return b"".join(self._chunks).decode("utf-8", "replace").strip()[-_STDERR_TAIL:]


class _Passfile:
    """A libpq passfile for one child process: mode 0600 in a private (0700) directory.

    ``env`` is the child's environment with ``PGPASSFILE`` pointing at it (no ``PGPASSWORD``);
    ``remove()`` deletes file and directory (idempotent, never raises). Without a password
    there is no file (libpq then reads the operator's own ``~/.pgpass``, if any, as before).
    """

    def __init__(self, base_env: dict[str, str], user: str, password: SecretStr | None) -> None:
        self.env = dict(base_env)
        self._dir: str | None = None
        if password is None:
            return
        self._dir = tempfile.mkdtemp(prefix="kmpops-pgpass-")
        path = os.path.join(self._dir, "pgpass")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:*:*:{_pgpass_field(user)}:{_pgpass_field(password.get_secret_value())}\n")
        self.env["PGPASSFILE"] = path

    def remove(self) -> None:
        """Delete the passfile and its directory."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _pgpass_field(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise UnsafeValueError("a database user or password may not contain a line break")
    return value.replace("\\", "\\\\").replace(":", "\\:")


class _Watchdog:
    """Kill a child process that runs past ``seconds`` (``expired`` tells it happened)."""

    def __init__(self, proc: subprocess.Popen[bytes], seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._proc = proc
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            self._proc.kill()

    def cancel(self) -> None:
        """Stop watching (the child is done)."""
        self._timer.cancel()


def _lock_wait_message(stderr: str) -> bool:
    return "LOCK TABLE" in stderr or "lock timeout" in stderr


class _DumpProcess:
    """A running ``pg_dump``: read ``stdout``; ``finish()`` waits and raises on failure.

    Its passfile lives as long as the process; ``tool_timeout`` bounds the whole run (the
    process is killed and ``finish`` raises CommandTimeout).
    """

    def __init__(
        self,
        argv: list[str],
        passfile: _Passfile,
        what: str,
        *,
        tool_timeout: float,
        lock_timeout: float,
    ) -> None:
        self.what = what
        self._passfile = passfile
        self._lock_timeout = lock_timeout
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=passfile.env,
                bufsize=_CHUNK,
            )
        except BaseException:
            passfile.remove()
            raise
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout: BinaryIO = self.proc.stdout  # type: ignore[assignment]
        self._stderr = _StderrTail(self.proc.stderr)  # type: ignore[arg-type]
        self._watchdog = _Watchdog(self.proc, tool_timeout)
        self._finished = False

    def finish(self, *_: Any) -> None:
        """Wait for pg_dump to exit; raise CommandFailed with its stderr tail if it failed
        (naming a table-lock wait that ran out), CommandTimeout if it ran past its bound."""
        if self._finished:
            return
        self._finished = True
        try:
            code = self.proc.wait()
        finally:
            self._watchdog.cancel()
            self._passfile.remove()
        self.stdout.close()
        if self._watchdog.expired:
            raise CommandTimeout(
                f"{self.what}: pg_dump ran past {self._watchdog.seconds:g}s and was stopped"
            )
        if code != 0:
            tail = self._stderr.text()
            if _lock_wait_message(tail):
                raise CommandFailed(
                    f"{self.what}: pg_dump waited more than {self._lock_timeout:g}s for a table "
                    f"lock (another session holds one; lock wait timeout): {tail}"
                )
            raise CommandFailed(f"{self.what}: pg_dump exited {code}: {tail}")

    def kill(self) -> None:
        """Stop pg_dump (the consumer failed); never raises."""
        self._finished = True
        self._watchdog.cancel()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.stdout.close()
        self._passfile.remove()


class PostgresDatabase:
    """One PostgreSQL database reached over TCP (or a socket directory) as ``user``.

    Connections are opened per call (no pooling); the object holds no open resources. Every
    session it opens carries ``statement_timeout`` and ``lock_timeout`` (seconds); pg_dump gets
    ``--lock-wait-timeout``; ``tool_timeout`` bounds a whole pg_dump / pg_restore run.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        dbname: str,
        password: SecretStr | str | None = None,
        bin_dir: Path | None = None,
        connect_timeout: float = 10,
        lock_timeout: float = 60,
        statement_timeout: float = 600,
        tool_timeout: float = 6 * 3600,
    ) -> None:
        self.host = _validate_host(host)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise UnsafeValueError(f"database port: {port!r} is not a TCP port")
        self.port = port
        self.user = _validate_name(user, what="database user")
        self.dbname = _validate_name(dbname, what="database name")
        self._password = (
            password if isinstance(password, SecretStr) or password is None else SecretStr(password)
        )
        self._bin_dir = Path(bin_dir) if bin_dir is not None else None
        for what, value in (
            ("connect_timeout", connect_timeout),
            ("lock_timeout", lock_timeout),
            ("statement_timeout", statement_timeout),
            ("tool_timeout", tool_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{what} must be more than 0 seconds, not {value!r}")
        self.connect_timeout = max(1, round(connect_timeout))  # libpq takes whole seconds
        self.lock_timeout = float(lock_timeout)
        self.statement_timeout = float(statement_timeout)
        self.tool_timeout = float(tool_timeout)

    def __repr__(self) -> str:
        return f"PostgresDatabase({self.user}@{self.host}:{self.port}/{self.dbname})"

    @property
    def bin_dir(self) -> Path:
        """Where pg_dump / pg_restore live (given, Debian's PostgreSQL 15, or PATH)."""
        if self._bin_dir is None:
            self._bin_dir = _find_bin_dir()
        return self._bin_dir

    def _where(self, dbname: str | None = None) -> str:
        return f"PostgreSQL {self.host}:{self.port}/{dbname or self.dbname}"

    def _passfile(self) -> _Passfile:
        """The environment of a child tool: no inherited PG* variables, the password in a
        private passfile (the caller removes it when the child has exited)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = str(self.connect_timeout)
        env["PGAPPNAME"] = "kmp-ops"
        return _Passfile(env, self.user, self._password)

    def _session_options(self) -> str:
        return (
            f"-c statement_timeout={_ms(self.statement_timeout)}"
            f" -c lock_timeout={_ms(self.lock_timeout)}"
        )

    def _conn_argv(self, dbname: str) -> list[str]:
        return [
            f"--host={self.host}",
            f"--port={self.port}",
            f"--username={self.user}",
            "--no-password",
            f"--dbname={dbname}",
        ]

    # -- SQL --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def connect(self, dbname: str | None = None, *, autocommit: bool = True) -> Iterator[Any]:
        """A psycopg connection to ``dbname`` (default: this database), closed on exit."""
        import psycopg

        name = _validate_name(dbname or self.dbname, what="database name")
        try:
            conn = psycopg.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                dbname=name,
                password=self._password.get_secret_value() if self._password else None,
                connect_timeout=self.connect_timeout,
                autocommit=autocommit,
                application_name="kmp-ops",
                options=self._session_options(),
            )
        except psycopg.OperationalError as exc:
            raise self._connect_error(exc, name) from None
        try:
            yield conn
        except psycopg.errors.LockNotAvailable as exc:
            raise ConnectorError(
                f"{self._where(name)}: waited more than {self.lock_timeout:g}s for a lock "
                f"(lock timeout): {_first_line(exc)}"
            ) from None
        except psycopg.errors.QueryCanceled as exc:
            raise CommandTimeout(
                f"{self._where(name)}: a statement ran past {self.statement_timeout:g}s "
                f"(statement timeout): {_first_line(exc)}"
            ) from None
        except psycopg.Error as exc:
            raise ConnectorError(
                f"{self._where(name)}: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        finally:
            conn.close()

    def _connect_error(self, exc: Exception, dbname: str) -> ConnectorError:
        text = _first_line(exc)
        if "password authentication failed" in text or "no password supplied" in text:
            return AuthenticationFailed(f"{self._where(dbname)} refused user {self.user!r}")
        if "does not exist" in text:
            return ConnectorError(f"{self._where(dbname)}: {text}")
        return HostUnreachable(f"{self._where(dbname)} is unreachable: {text}")

    def run_sql(
        self, sql: str, dbname: str | None = None, params: tuple[Any, ...] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) and return its rows ([] if it returns none).

        ``sql`` is code; values go in ``params`` (``%s`` placeholders), never formatted in.
        """
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def server_version(self) -> str:
        """The server's version string, e.g. ``15.8 (Debian 15.8-0+deb12u1)``."""
        return str(self.run_sql("SHOW server_version")[0][0])

    def list_databases(self) -> list[str]:
        """The names of every database on this server, sorted."""
        return [
            str(r[0])
            for r in self.run_sql("SELECT datname FROM pg_database ORDER BY 1", "postgres")
        ]

    def swap_in(self, staging: str, target: str, previous: str | None) -> None:
        """Make database ``staging`` the one called ``target``, in one transaction.

        With ``previous``, the current ``target`` is renamed to ``previous`` first (its sessions
        are ended; the rename's lock keeps new ones out until the commit). Both renames commit
        together or not at all (PostgreSQL runs ALTER DATABASE … RENAME inside a transaction
        block), so at every moment exactly one database is called ``target``, and a process
        killed in the middle changes nothing. A session that reconnects to ``target`` between
        ending it and the rename makes the rename fail ("being accessed by other users"): the
        transaction rolls back and the swap is tried again, three times in all. Raises
        ConnectorError if it still cannot be done (nothing renamed).
        """
        from psycopg import sql

        for name in (staging, target, *((previous,) if previous else ())):
            _validate_name(name, what="database name")
        rename = "ALTER DATABASE {} RENAME TO {}"
        for attempt in range(3):
            try:
                with self.connect("postgres") as conn, conn.transaction():
                    if previous:
                        conn.execute(
                            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                            " WHERE datname = %s AND pid <> pg_backend_pid()",
                            (target,),
                        )
                        conn.execute(
                            sql.SQL(rename).format(sql.Identifier(target), sql.Identifier(previous))
                        )
                    conn.execute(
                        sql.SQL(rename).format(sql.Identifier(staging), sql.Identifier(target))
                    )
                return
            except ConnectorError as exc:
                # retry only when a session came back to the target (never for the staging copy)
                busy = f'database "{target}" is being accessed by other users' in str(exc)
                if not busy or attempt == 2:
                    exc.add_note(f"{self._where(target)}: nothing was renamed")
                    raise

    def database_exists(self, name: str) -> bool:
        """True if database ``name`` exists on this server."""
        _validate_name(name, what="database name")
        return bool(
            self.run_sql("SELECT 1 FROM pg_database WHERE datname = %s", "postgres", (name,))
        )

    def create_database(self, name: str) -> None:
        """Create database ``name``; ConnectorError if it already exists.

        UnsafeValueError for a name PostgreSQL would silently truncate (over 63 bytes).
        """
        from psycopg import sql

        _validate_name(name, what="database name")
        if len(name.encode()) > _PG_MAX_IDENT:
            raise UnsafeValueError(f"database name {name!r} is longer than {_PG_MAX_IDENT} bytes")
        with self.connect("postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str, missing_ok: bool = True) -> None:
        """Drop database ``name``, disconnecting its sessions (``WITH (FORCE)``).

        Refuses to drop the object's own database or ``postgres``/templates (UnsafeValueError).
        """
        from psycopg import sql

        _validate_name(name, what="database name")
        if name in ("postgres", "template0", "template1"):
            raise UnsafeValueError(f"refusing to drop system database {name!r}")
        stmt = (
            "DROP DATABASE IF EXISTS {} WITH (FORCE)"
            if missing_ok
            else "DROP DATABASE {} WITH (FORCE)"
        )
        with self.connect("postgres") as conn:
            conn.execute(sql.SQL(stmt).format(sql.Identifier(name)))

    def table_row_counts(self, dbname: str | None = None) -> dict[str, int]:
        """Exact ``count(*)`` of every user table, keyed ``schema.table`` (sorted)."""
        with self.connect(dbname) as conn:
            return _count_rows(conn)

    # -- dump -----------------------------------------------------------------------------------

    def _dump_argv(
        self, dbname: str, snapshot: str | None, compress_level: int | None
    ) -> list[str]:
        argv = [
            str(self.bin_dir / "pg_dump"),
            "--format=custom",
            f"--lock-wait-timeout={_ms(self.lock_timeout)}",
            *self._conn_argv(dbname),
        ]
        if snapshot is not None:
            if not re.fullmatch(r"[0-9A-Fa-f-]+", snapshot):
                raise UnsafeValueError(f"snapshot id {snapshot!r} is malformed")
            argv.append(f"--snapshot={snapshot}")
        if compress_level is not None:
            argv.append(f"--compress={int(compress_level)}")
        return argv

    def _start_dump(
        self,
        *,
        dbname: str | None = None,
        snapshot: str | None = None,
        compress_level: int | None = None,
    ) -> _DumpProcess:
        name = _validate_name(dbname or self.dbname, what="database name")
        return _DumpProcess(
            self._dump_argv(name, snapshot, compress_level),
            self._passfile(),
            self._where(name),
            tool_timeout=self.tool_timeout,
            lock_timeout=self.lock_timeout,
        )

    @contextlib.contextmanager
    def dump_stream(
        self, *, dbname: str | None = None, snapshot: str | None = None
    ) -> Iterator[BinaryIO]:
        """``pg_dump -Fc`` of the database as a readable stream (no temporary file).

        On a clean exit of the block, pg_dump's exit status is checked: non-zero raises
        CommandFailed with the tail of its stderr. If the block raises, pg_dump is killed.
        ``snapshot`` is an id from ``pg_export_snapshot()`` held open by the caller.
        """
        dump = self._start_dump(dbname=dbname, snapshot=snapshot)
        try:
            yield dump.stdout
        except BaseException:
            dump.kill()
            raise
        # drain what the consumer left so pg_dump can exit, then check its status
        with contextlib.suppress(OSError, ValueError):
            while dump.stdout.read(_CHUNK):
                pass
        dump.finish()

    def dump_to_store(
        self,
        store: ObjectStore,
        key: str,
        *,
        compress: Compression = "none",
        dbname: str | None = None,
        snapshot: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> PutResult:
        """Stream ``pg_dump -Fc`` into ``store`` under ``key``; return size and SHA-256.

        ``compress="none"`` keeps pg_dump's own compression; ``"zstd"`` runs pg_dump with
        ``--compress=0`` and compresses with zstd in-process (faster, smaller; recorded as
        ``compression: zstd`` metadata — restore with ``compression="zstd"``). The object becomes
        visible only if pg_dump exited 0; otherwise the upload is aborted and CommandFailed
        raised.
        """
        if compress not in ("none", "zstd"):
            raise ValueError(f"compress must be 'none' or 'zstd', not {compress!r}")
        dump = self._start_dump(
            dbname=dbname, snapshot=snapshot, compress_level=0 if compress == "zstd" else None
        )
        meta = {**(metadata or {}), "format": "pg_dump-custom", "compression": compress}
        try:
            if compress == "zstd":
                import zstandard

                compressor = zstandard.ZstdCompressor(compression_params=_zstd_params(zstandard))
                with compressor.stream_reader(dump.stdout, read_size=_CHUNK, closefd=False) as zs:
                    result = store.put_stream(key, zs, metadata=meta, before_commit=dump.finish)  # type: ignore[arg-type]
            else:
                result = store.put_stream(
                    key, dump.stdout, metadata=meta, before_commit=dump.finish
                )
        except BaseException:
            dump.kill()
            raise
        return result

    def snapshot_row_counts_and_dump(
        self,
        store: ObjectStore,
        key: str,
        *,
        compress: Compression = "none",
        metadata: dict[str, str] | None = None,
    ) -> SnapshotDump:
        """Dump into ``store`` and count every table's rows in one consistent snapshot.

        A REPEATABLE READ transaction exports its snapshot (``pg_export_snapshot()``) and stays
        open while ``pg_dump --snapshot`` imports it; the counts are taken in that same
        transaction, so they describe exactly the data in the dump — what a backup manifest needs.
        """
        with self.connect() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = str(conn.execute("SELECT pg_export_snapshot()").fetchone()[0])
            version = str(conn.execute("SHOW server_version").fetchone()[0])
            counts: dict[str, int] = {}
            failure: list[BaseException] = []

            def count() -> None:
                try:
                    counts.update(_count_rows(conn))
                except BaseException as exc:
                    failure.append(exc)

            # counting and dumping run side by side; both read the same snapshot
            counter = threading.Thread(target=count, name="row-counts")
            counter.start()
            try:
                put = self.dump_to_store(
                    store, key, compress=compress, snapshot=snapshot, metadata=metadata
                )
            finally:
                counter.join()
            conn.execute("ROLLBACK")
        if failure:
            with contextlib.suppress(Exception):
                store.delete(key)
            raise ConnectorError(f"{self._where()}: counting rows failed: {failure[0]}") from None
        return SnapshotDump(
            put=put, row_counts=counts, snapshot_id=snapshot, server_version=version
        )

    # -- restore --------------------------------------------------------------------------------

    def _restore_argv(self, target_db: str, jobs: int | None) -> list[str]:
        argv = [
            str(self.bin_dir / "pg_restore"),
            *self._conn_argv(target_db),
            "--no-owner",
            "--exit-on-error",
        ]
        if jobs is not None:
            argv.append(f"--jobs={int(jobs)}")
        return argv

    def _prepare_target(self, target_db: str, create: bool) -> bool:
        _validate_name(target_db, what="target database")
        if create:
            if self.database_exists(target_db):
                raise ConnectorError(
                    f"{self._where(target_db)} already exists; restore into a new database "
                    "(or drop it first)"
                )
            self.create_database(target_db)
            return True
        return False

    def restore_from_stream(
        self,
        stream: BinaryIO,
        target_db: str,
        *,
        create: bool = True,
        compression: Compression = "none",
    ) -> None:
        """``pg_restore`` a custom-format dump read from ``stream`` into ``target_db``.

        With ``create`` the target must not exist; it is created, and dropped again if the
        restore fails (rollback). Raises CommandFailed with pg_restore's stderr tail.
        """
        created = self._prepare_target(target_db, create)
        passfile = self._passfile()
        try:
            proc = subprocess.Popen(
                self._restore_argv(target_db, None),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=passfile.env,
            )
            watchdog = _Watchdog(proc, self.tool_timeout)
            assert proc.stdin is not None and proc.stderr is not None
            stderr = _StderrTail(proc.stderr)  # type: ignore[arg-type]
            source: Any = stream
            if compression == "zstd":
                import zstandard

                source = zstandard.ZstdDecompressor().stream_reader(stream, closefd=False)
            try:
                while chunk := source.read(_CHUNK):
                    proc.stdin.write(chunk)
            except BrokenPipeError:
                pass  # pg_restore stopped reading; its status says why
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                with contextlib.suppress(BrokenPipeError, OSError):
                    proc.stdin.close()
            code = proc.wait()
            watchdog.cancel()
            if watchdog.expired:
                raise CommandTimeout(
                    f"{self._where(target_db)}: pg_restore ran past {self.tool_timeout:g}s "
                    "and was stopped"
                )
            if code != 0:
                raise CommandFailed(
                    f"{self._where(target_db)}: pg_restore exited {code}: {stderr.text()}"
                )
        except BaseException:
            if created:
                with contextlib.suppress(Exception):
                    self.drop_database(target_db)
            raise
        finally:
            passfile.remove()

    def restore_from_file(
        self,
        path: Path,
        target_db: str,
        *,
        jobs: int = 2,
        create: bool = True,
        compression: Compression = "none",
    ) -> None:
        """``pg_restore --jobs`` a custom-format dump file into ``target_db``.

        ``compression="zstd"`` decompresses to a temporary file beside ``path`` first (parallel
        restore needs a seekable file). Rollback as :meth:`restore_from_stream`.
        """
        path = Path(path)
        if not path.is_file():
            raise ConnectorError(f"restore: dump file {path} does not exist")
        if jobs < 1:
            raise ValueError("jobs must be at least 1")
        if compression == "zstd":
            import zstandard

            fd, plain_name = tempfile.mkstemp(
                prefix=f".{path.name}.", suffix=".dump", dir=path.parent
            )
            try:
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    zstandard.ZstdDecompressor().copy_stream(src, out)
                self.restore_from_file(Path(plain_name), target_db, jobs=jobs, create=create)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(plain_name)
            return
        created = self._prepare_target(target_db, create)
        passfile = self._passfile()
        try:
            try:
                result = subprocess.run(
                    [*self._restore_argv(target_db, jobs), str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=passfile.env,
                    check=False,
                    timeout=self.tool_timeout,
                )
            except subprocess.TimeoutExpired:
                raise CommandTimeout(
                    f"{self._where(target_db)}: pg_restore ran past {self.tool_timeout:g}s "
                    "and was stopped"
                ) from None
            if result.returncode != 0:
                tail = result.stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
                raise CommandFailed(
                    f"{self._where(target_db)}: pg_restore exited {result.returncode}: {tail}"
                )
        except BaseException:
            if created:
                with contextlib.suppress(Exception):
                    self.drop_database(target_db)
            raise
        finally:
            passfile.remove()


def _zstd_params(zstandard: Any) -> Any:
    """zstd level 3 on at most two worker threads with 1 MiB jobs.

    Worker threads let pg_dump, compression and the upload overlap (compressing in the reading
    thread stalls pg_dump on a full pipe). Their memory is per job, not per byte: zstd's default
    job (4x the 2 MiB window) held 60+ MB on 2 workers, and ``threads=-1`` starts one worker per
    core, so the default grew with the machine; 1 MiB jobs on two workers hold ~6 MB. The
    output is a standard zstd frame either way (``zstd -d`` reads it).
    """
    return zstandard.ZstdCompressionParameters.from_level(
        3, threads=min(2, os.cpu_count() or 1), job_size=_CHUNK
    )


def _ms(seconds: float) -> int:
    """Whole milliseconds (at least 1) for a PostgreSQL timeout setting."""
    return max(1, round(seconds * 1000))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _count_rows(conn: Any) -> dict[str, int]:
    """Exact row counts of every ordinary user table visible to ``conn`` (its transaction)."""
    from psycopg import sql

    tables = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r'
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
        ORDER BY 1, 2
        """
    ).fetchall()
    counts: dict[str, int] = {}
    for schema, table in tables:
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(table)
        )
        counts[f"{schema}.{table}"] = int(conn.execute(query).fetchone()[0])
    return counts


class SQLiteDatabase:
    """A SQLite database file: consistent online copies and row counts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SQLiteDatabase({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise ConnectorError(f"SQLite database {self.path} does not exist")
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)

    def backup_to(self, dest: Path) -> Path:
        """Copy the database to ``dest`` with SQLite's online backup API (consistent even while
        others write). Written to a temporary file and renamed, so ``dest`` is never partial."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            src = self._connect()
            try:
                out = sqlite3.connect(tmp_name)
                try:
                    src.backup(out, pages=4096)
                finally:
                    out.close()
            finally:
                src.close()
            os.replace(tmp_name, dest)
        except sqlite3.Error as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise ConnectorError(f"SQLite backup of {self.path} failed: {exc}") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return dest

    def table_row_counts(self) -> dict[str, int]:
        """Exact ``count(*)`` of every user table (``sqlite_*`` internals excluded), sorted."""
        conn = self._connect()
        try:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
                )
            ]
            return {
                name: int(
                    conn.execute(
                        f'SELECT count(*) FROM "{name.replace(chr(34), chr(34) * 2)}"'
                    ).fetchone()[0]
                )
                for name in names
            }
        except sqlite3.Error as exc:
            raise ConnectorError(f"SQLite {self.path}: {exc}") from None
        finally:
            conn.close()
