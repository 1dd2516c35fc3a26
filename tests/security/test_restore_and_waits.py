"""Issue #10 findings as attacks on the real stack: restore authority, unbounded waits, restores
that go live unproven, and the database password in child environments.

Real PostgreSQL, SeaweedFS and sshd hosts of the session stack, real Prefect flows. Each test
states what a user would notice: a refused run with its message, a database that kept its rows,
a catalog without a complete backup, a child process's environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flows.backup_fixtures import (
    TABLES,
    BackupEnv,
    drop_env,
    make_env,
    run_in_thread,
    seed_database,
    wait_for,
)

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

# the bound each hanging test waits for the flow before calling it hung (not a measurement)
HUNG_AFTER_S = 120


def _edit_config(env: BackupEnv, change: Any) -> None:
    cfg = yaml.safe_load(env.ops_yaml.read_text())
    change(cfg)
    env.ops_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture
def bk(stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BackupEnv]:
    env = make_env(stack, tmp_path)
    seed_database(env)
    monkeypatch.setenv("KMPOPS_CONFIG", str(env.ops_yaml))
    yield env
    drop_env(env)


def _databases_like(env: BackupEnv, pattern: str) -> list[str]:
    with env.pg("postgres") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (pattern,)
        ).fetchall()
    return [r[0] for r in rows]


def _seed_billing(env: BackupEnv) -> str:
    """A second configured database, ``billing``, with one marker row."""
    billing = f"{env.dbname}_billing"
    with env.pg("postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{billing}"')
    with env.pg(billing) as conn:
        conn.execute("CREATE TABLE invoices (id int PRIMARY KEY)")
        conn.execute("INSERT INTO invoices VALUES (42)")

    def add(cfg: dict[str, Any]) -> None:
        cfg["databases"]["billing"] = {**cfg["databases"]["shop"], "dbname": billing}
        cfg["databases"]["billing"]["sanity_queries"] = []
        # an approval that would be asked for expires quickly (reject), so no test waits 10 min
        cfg["environments"]["production"]["policy"]["approval_timeout"] = "3s"

    _edit_config(env, add)
    return billing


def _invoices(env: BackupEnv, dbname: str) -> list[int]:
    with env.pg(dbname) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM invoices ORDER BY id").fetchall()]


# -- 1. restore-database authority -------------------------------------------------------------


def test_environment_parameter_cannot_turn_production_into_dev(bk: BackupEnv) -> None:
    """``restore-database(database="app", environment="dev")`` swapped production without an
    approval. The environment is the database's (production); a different one is refused."""
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups
    from kmpops.errors import PolicyViolation

    backup_database(["shop"])
    verify_backups(databases=["shop"], hosts=[])
    with bk.pg() as conn:
        conn.execute("DELETE FROM order_lines")  # production's current state, to be kept

    with pytest.raises(PolicyViolation, match=r"environment 'dev'.*production"):
        restore_database("shop", environment="dev")
    assert bk.counts(bk.dbname)["order_lines"] == 0  # untouched
    assert _databases_like(bk, f"{bk.dbname}\\_\\_%") == []  # no copy was made or swapped
    assert bk.records().approvals() == []


def test_restore_cannot_target_another_configured_database(bk: BackupEnv) -> None:
    """With ``target_dbname`` naming another configured database the restore replaced it (and,
    with environment="dev", without approval or safety backup). It is refused before anything
    is asked or changed."""
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups
    from kmpops.errors import PolicyViolation

    billing = _seed_billing(bk)
    backup_database(["shop"])
    verify_backups(databases=["shop"], hosts=[])

    with pytest.raises(PolicyViolation):
        restore_database("shop", environment="dev", target_dbname=billing)
    with pytest.raises(PolicyViolation, match=f"{billing}.*configured database billing"):
        restore_database("shop", target_dbname=billing)
    assert _invoices(bk, billing) == [42]
    assert bk.records().approvals() == []
    assert [b.name for b in bk.records().backups() if b.name == "billing"] == []

    # a name outside the configured scratch pattern is refused too; one inside it is a new
    # scratch database, restored without an approval (nothing existing is replaced)
    with pytest.raises(PolicyViolation, match="scratch"):
        restore_database("shop", target_dbname=f"{bk.dbname}_elsewhere")
    scratch = f"{bk.dbname}_restore_check"
    result = restore_database("shop", target_dbname=scratch)
    assert result["previous_dbname"] is None and result["safety_backup"] is None
    assert bk.counts(scratch) == TABLES


# -- 2. a restore is proven before it goes live --------------------------------------------


def _as_development(env: BackupEnv) -> None:
    """``shop`` lives in a development environment: restores over it need no approval."""

    def change(cfg: dict[str, Any]) -> None:
        cfg["environments"]["development"] = {"hosts": [], "policy": {}}
        cfg["databases"]["shop"]["environment"] = "development"

    _edit_config(env, change)


def test_copy_one_row_short_never_goes_live(bk: BackupEnv) -> None:
    """Row counts were compared after the swap: a short copy went live. Now the copy is checked
    against the manifest first, the target keeps its rows and the run names the difference."""
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from kmpops.errors import IntegrityError

    _as_development(bk)
    [manifest] = backup_database(["shop"])
    rec = bk.records()
    claimed = dict(manifest["table_row_counts"])
    claimed["public.customers"] += 1  # the dump holds one row fewer than its manifest says
    rec.update_backup(
        manifest["record_id"],
        manifest={k: v for k, v in manifest.items() if k != "record_id"}
        | {"table_row_counts": claimed},
    )
    with bk.pg() as conn:
        conn.execute("INSERT INTO customers VALUES (999999, 'kept')")

    with pytest.raises(IntegrityError, match=r"public\.customers: manifest 2001, restored 2000"):
        restore_database("shop", backup_id=manifest["record_id"])
    assert bk.counts(bk.dbname)["customers"] == TABLES["customers"] + 1  # still the target's
    with bk.pg() as conn:
        assert conn.execute("SELECT name FROM customers WHERE id = 999999").fetchone() == ("kept",)
    assert _databases_like(bk, f"{bk.dbname}\\_\\_%") == []  # the unproven copy was dropped


def test_old_previous_copies_are_dropped_by_retention(bk: BackupEnv) -> None:
    """``__pre_*`` copies were never cleaned up. They are kept for the configured time
    (default 7 days) and then dropped by backup-retention; younger ones stay."""
    from flows.backup_retention import backup_retention

    old = f"{bk.dbname}__pre_20200101000000"
    young = f"{bk.dbname}__pre_{datetime.now(UTC):%Y%m%d%H%M%S}"
    unrelated = f"{bk.dbname}_pre_20200101000000"  # not a kmp-ops copy of a configured database
    with bk.pg("postgres", autocommit=True) as conn:
        for name in (old, young, unrelated):
            conn.execute(f'CREATE DATABASE "{name}"')

    result = backup_retention()
    assert _databases_like(bk, f"{bk.dbname}%pre%") == sorted([young, unrelated])
    assert result["previous_copies_dropped"] == [old]


# -- 3. every wait has a bound ------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sftp_server_stopped_mid_transfer_fails_within_bound(
    bk: BackupEnv, stack: Any, tmp_path: Path
) -> None:
    """A stalled sftp-server (stopped with SIGSTOP; the SSH connection still answers keepalives)
    blocked a configuration backup forever. With ``timeouts.sftp`` the read fails, naming the
    host and what it was reading, and the backup is recorded failed."""
    import threading

    from flows.backup_configuration import backup_configuration

    _edit_config(bk, lambda cfg: cfg.update(timeouts={"sftp": "2s"}))
    host = "stg-1"
    conf = bk.config_dirs[host]
    conf.mkdir(parents=True)
    for i in range(1500):  # many files: the transfer is under way when the server is stopped
        (conf / f"part-{i:04d}.conf").write_bytes(os.urandom(4096))
    sshd_pid = int((Path(stack.host(host).root) / "run" / "sshd.pid").read_text().strip())
    stopped: list[int] = []
    done = threading.Event()

    def stall_sftp_servers() -> None:
        while not done.is_set():
            for pid in _descendants(sshd_pid):
                if pid not in stopped and b"internal-sftp" in _cmdline(pid):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            done.wait(0.002)

    watcher = threading.Thread(target=stall_sftp_servers, daemon=True)
    watcher.start()
    thread, box = run_in_thread(backup_configuration, hosts=[host])
    try:
        thread.join(HUNG_AFTER_S)
        assert not thread.is_alive(), "backup-configuration hung on a stopped sftp-server"
    finally:
        done.set()
        watcher.join(10)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
    assert stopped, "no sftp-server was seen"
    error = box.get("error")
    assert error is not None, box
    assert f"host {host}" in str(error) and "timed out" in str(error)
    assert "read of" in str(error) and str(conf) in str(error)
    rows = bk.records().backups(kind="configuration", name=host)
    assert rows and all(r.state == "failed" for r in rows)


class _StallingSource:
    """A file to upload that stops the host's sftp-server (SIGSTOP) once the upload is under
    way: its second read happens after the first chunk went out."""

    def __init__(self, sshd_pid: int) -> None:
        self.sshd_pid = sshd_pid
        self.stopped: list[int] = []
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 2:
            for pid in _descendants(self.sshd_pid):
                if b"internal-sftp" in _cmdline(pid):
                    os.kill(pid, signal.SIGSTOP)
                    self.stopped.append(pid)
        return os.urandom(32768) if self.reads < 4000 else b""  # ~128 MB if never stopped


def test_sftp_upload_to_a_stopped_server_fails_within_bound(stack: Any, tmp_path: Path) -> None:
    """The upload direction: put() into a stopped sftp-server blocked forever (the window
    fills, keepalives are still answered). With the configured ``timeouts.sftp`` it fails with
    CommandTimeout naming the host and the file, and the connection works again afterwards."""
    from kmpops.config import load_config
    from kmpops.connectors.ssh import SSHConnection
    from kmpops.errors import CommandTimeout

    cfg_data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    cfg_data["timeouts"] = {"sftp": "2s"}
    ops_yaml = tmp_path / "ops.yaml"
    ops_yaml.write_text(yaml.safe_dump(cfg_data, sort_keys=False))
    cfg = load_config(ops_yaml)
    _, host = cfg.host("stg-2")
    # tmp/: the deploy user may write there (the host's root directory is root's)
    remote = f"{stack.host('stg-2').root}/tmp/upload-{os.urandom(4).hex()}.bin"
    sshd_pid = int((Path(stack.host("stg-2").root) / "run" / "sshd.pid").read_text().strip())
    source = _StallingSource(sshd_pid)
    with SSHConnection.from_host(host, **cfg.timeouts.ssh_options()) as conn:
        thread, box = run_in_thread(conn.put, source, remote)  # type: ignore[arg-type]
        try:
            thread.join(HUNG_AFTER_S)
            assert not thread.is_alive(), "put() hung on a stopped sftp-server"
        finally:
            for pid in source.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    os.kill(pid, signal.SIGCONT)
        assert source.stopped, "no sftp-server was seen"
        error = box.get("error")
        assert isinstance(error, CommandTimeout), box
        assert "host stg-2" in str(error) and remote in str(error) and "2s" in str(error)
        assert not Path(remote).exists()  # the file never appeared under its name
        conn.put_bytes(b"after\n", remote)  # a fresh SFTP session on the same connection
        assert conn.stat(remote).size == 6
    Path(remote).unlink()


@contextlib.contextmanager
def _table_locked(env: BackupEnv, table: str) -> Iterator[int]:
    """Hold ``table`` ACCESS EXCLUSIVE in another session; yields that session's pid."""
    conn = env.pg(autocommit=False)
    try:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    finally:
        conn.rollback()
        conn.close()


def test_table_locked_during_backup_fails_with_lock_timeout(bk: BackupEnv) -> None:
    """One ACCESS EXCLUSIVE lock held a backup (and its snapshot) open forever. With
    ``timeouts.database_lock`` pg_dump and the row counts give up, the run fails naming the
    database and the lock, nothing is cataloged complete, and no kmp-ops session is left."""
    from flows.backup_database import backup_database

    _edit_config(bk, lambda cfg: cfg.update(timeouts={"database_lock": "1s"}))
    with _table_locked(bk, "orders"):
        thread, box = run_in_thread(backup_database, ["shop"])
        thread.join(HUNG_AFTER_S)
        assert not thread.is_alive(), "backup-database hung on a locked table"
        with bk.pg("postgres") as conn:
            ours = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND application_name IN ('kmp-ops', 'pg_dump')",
                (bk.dbname,),
            ).fetchone()[0]
        assert ours == 0  # our sessions are gone while the other session still holds its lock
    error = box.get("error")
    assert error is not None, box
    assert bk.dbname in str(error) and "lock" in str(error)
    rows = bk.records().backups(kind="database", name="shop")
    assert rows and all(r.state == "failed" for r in rows)
    assert bk.keys("database/") == []
    # the lock is released: the next backup completes
    [manifest] = backup_database(["shop"])
    assert manifest["table_row_counts"]["public.orders"] == TABLES["orders"]


# -- 4. the password never sits in a child's environment --------------------------------------


def _children(name: str) -> list[int]:
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
                if comm == name and stat.rsplit(")", 1)[1].split()[1] == me:
                    found.append(int(entry))
    return found


def test_pg_dump_environment_holds_no_password(bk: BackupEnv) -> None:
    """``PGPASSWORD`` sat in pg_dump's environment (readable in /proc/<pid>/environ). The
    password now reaches it in a mode-0600 passfile that is removed when pg_dump is done."""
    from flows.backup_database import backup_database

    password = "pw-" + os.urandom(8).hex()
    secret_file = bk.root / "shop.password"
    secret_file.write_text(password)
    secret_file.chmod(0o600)
    _edit_config(bk, lambda cfg: cfg["databases"]["shop"].update(password=f"file:{secret_file}"))
    with _table_locked(bk, "orders"):  # pg_dump waits for the lock: we read it meanwhile
        thread, box = run_in_thread(backup_database, ["shop"])
        [pid] = wait_for(lambda: _children("pg_dump"), timeout=60, interval=0.02)
        environ = dict(
            item.split(b"=", 1)
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        assert b"PGPASSWORD" not in environ
        assert password.encode() not in b"".join(environ.values())
        passfile = Path(environ[b"PGPASSFILE"].decode())
        assert passfile.stat().st_mode & 0o777 == 0o600
    thread.join(HUNG_AFTER_S)
    assert "error" not in box, box.get("error")
    assert not passfile.exists()
