"""PostgresDatabase against a real PostgreSQL 15 cluster; SQLiteDatabase on a real file."""

from __future__ import annotations

import io
import sqlite3
import subprocess
from pathlib import Path

import pytest

from kmpops.connectors.database import PostgresDatabase, SQLiteDatabase
from kmpops.connectors.storage import LocalStore, PutResult
from kmpops.errors import (
    CommandFailed,
    CommandTimeout,
    ConnectorError,
    HostUnreachable,
    UnsafeValueError,
)
from kmpops.stack import postgres

EXPECTED = {"app.orders": 3000, "public.customers": 1500, "public.events": 4000}


@pytest.fixture(scope="module")
def pg(stack):
    """The session stack's PostgreSQL cluster."""
    fields = {
        k: Path(v) if k in ("bin_dir", "data_dir", "pid_file") else v
        for k, v in stack.postgres.items()
    }
    return postgres.PGInfo(**fields)


@pytest.fixture(scope="module")
def app_db(pg):
    admin = PostgresDatabase(host=pg.host, port=pg.port, user=pg.user, dbname="postgres")
    admin.drop_database("conn_app")
    admin.create_database("conn_app")
    db = PostgresDatabase(
        host=pg.host, port=pg.port, user=pg.user, dbname="conn_app", bin_dir=pg.bin_dir
    )
    for stmt in (
        "CREATE SCHEMA app",
        "CREATE TABLE public.customers (id int PRIMARY KEY, name text NOT NULL)",
        "INSERT INTO public.customers SELECT g, 'customer ' || g FROM generate_series(1, 1500) g",
        "CREATE TABLE app.orders (id int PRIMARY KEY, customer int REFERENCES public.customers,"
        " amount numeric)",
        "INSERT INTO app.orders SELECT g, 1 + g % 1500, g * 1.5 FROM generate_series(1, 3000) g",
        "CREATE TABLE public.events (id bigserial PRIMARY KEY, payload bytea)",
        "INSERT INTO public.events (payload) SELECT decode(md5(g::text), 'hex')"
        " FROM generate_series(1, 4000) g",
        "CREATE INDEX events_payload ON public.events (payload)",
    ):
        db.run_sql(stmt)
    return db


def _pg_restore(pg, dbname: str, dump_path) -> None:
    """Restore with the plain PostgreSQL tools, as an operator would without kmp-ops."""
    subprocess.run(
        [str(pg.bin_dir / "createdb"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user, dbname],
        check=True,
    )
    subprocess.run(
        [
            str(pg.bin_dir / "pg_restore"),
            "-h",
            pg.host,
            "-p",
            str(pg.port),
            "-U",
            pg.user,
            "-d",
            dbname,
            str(dump_path),
        ],
        check=True,
    )


def test_row_counts_and_version(app_db):
    assert app_db.table_row_counts() == EXPECTED
    assert app_db.server_version().startswith("15.")
    assert app_db.database_exists("conn_app") and not app_db.database_exists("nope")


def test_dump_stream_into_store_restores_with_plain_pg_restore(pg, app_db, tmp_path):
    store = LocalStore(tmp_path / "objects")
    with app_db.dump_stream() as stream:
        put = store.put_stream("db/app.dump", stream)
    assert put.size > 10_000
    dump_file = tmp_path / "app.dump"
    store.download("db/app.dump", dump_file, expected_sha256=put.sha256)
    app_db.drop_database("conn_app_plain")
    _pg_restore(pg, "conn_app_plain", dump_file)
    assert app_db.table_row_counts("conn_app_plain") == EXPECTED
    app_db.drop_database("conn_app_plain")


def test_restore_from_file_parallel_and_from_stream(app_db, tmp_path):
    store = LocalStore(tmp_path / "objects")
    put = app_db.dump_to_store(store, "db/app.dump")
    dump_file = tmp_path / "app.dump"
    store.download("db/app.dump", dump_file, expected_sha256=put.sha256)
    for name in ("conn_app_r1", "conn_app_r2"):
        app_db.drop_database(name)
    app_db.restore_from_file(dump_file, "conn_app_r1", jobs=2)
    assert app_db.table_row_counts("conn_app_r1") == EXPECTED
    with open(dump_file, "rb") as fh:
        app_db.restore_from_stream(fh, "conn_app_r2")
    assert app_db.table_row_counts("conn_app_r2") == EXPECTED
    # restoring over an existing database is refused and changes nothing
    with pytest.raises(ConnectorError, match="already exists"):
        app_db.restore_from_file(dump_file, "conn_app_r1")
    assert app_db.table_row_counts("conn_app_r1") == EXPECTED
    for name in ("conn_app_r1", "conn_app_r2"):
        app_db.drop_database(name)


def test_dump_to_s3_and_restore(app_db, stack, tmp_path):
    from kmpops.connectors.storage import S3Store

    s3 = stack.s3
    with S3Store(
        bucket=s3["bucket"],
        endpoint_url=s3["endpoint_url"],
        access_key_id=s3["access_key_id"],
        secret_access_key=s3["secret_access_key"],
    ) as store:
        snap = app_db.snapshot_row_counts_and_dump(store, "conn-tests/app.dump")
        assert store.head("conn-tests/app.dump").sha256 == snap.put.sha256
        dump_file = tmp_path / "app.dump"
        store.download("conn-tests/app.dump", dump_file, expected_sha256=snap.put.sha256)
        store.delete("conn-tests/app.dump")
    app_db.drop_database("conn_app_s3")
    app_db.restore_from_file(dump_file, "conn_app_s3", jobs=2)
    assert app_db.table_row_counts("conn_app_s3") == snap.row_counts == EXPECTED
    app_db.drop_database("conn_app_s3")


def test_zstd_dump_round_trip(app_db, tmp_path):
    store = LocalStore(tmp_path / "objects")
    put = app_db.dump_to_store(store, "db/app.dump.zst", compress="zstd")
    assert store.head("db/app.dump.zst").metadata["compression"] == "zstd"
    buf = io.BytesIO()
    store.download("db/app.dump.zst", buf, expected_sha256=put.sha256)
    buf.seek(0)
    app_db.drop_database("conn_app_z")
    app_db.restore_from_stream(buf, "conn_app_z", compression="zstd")
    assert app_db.table_row_counts("conn_app_z") == EXPECTED
    app_db.drop_database("conn_app_z")


def test_snapshot_counts_match_dump_while_writes_continue(app_db, tmp_path):
    store = LocalStore(tmp_path / "objects")
    import threading

    stop = threading.Event()

    def writer() -> None:
        n = 100_000
        while not stop.is_set():
            app_db.run_sql("INSERT INTO public.events (payload) VALUES ('\\x00')")
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        snap = app_db.snapshot_row_counts_and_dump(store, "db/snap.dump")
    finally:
        stop.set()
        thread.join()
    assert isinstance(snap.put, PutResult) and snap.server_version.startswith("15.")
    assert snap.row_counts["public.customers"] == 1500
    dump_file = tmp_path / "snap.dump"
    store.download("db/snap.dump", dump_file, expected_sha256=snap.put.sha256)
    app_db.drop_database("conn_app_snap")
    app_db.restore_from_file(dump_file, "conn_app_snap", jobs=2)
    assert app_db.table_row_counts("conn_app_snap") == snap.row_counts
    app_db.drop_database("conn_app_snap")
    app_db.run_sql("DELETE FROM public.events WHERE id > 4000")


def test_failed_dump_leaves_no_object(pg, tmp_path):
    store = LocalStore(tmp_path / "objects")
    missing = PostgresDatabase(host=pg.host, port=pg.port, user=pg.user, dbname="does_not_exist")
    with pytest.raises(CommandFailed, match="does_not_exist"):
        missing.dump_to_store(store, "db/missing.dump")
    assert not store.exists("db/missing.dump")
    with pytest.raises(CommandFailed), missing.dump_stream() as stream:
        stream.read()


def test_bad_restore_drops_created_database(app_db, tmp_path):
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"this is not a dump")
    with pytest.raises(CommandFailed, match="pg_restore exited"):
        app_db.restore_from_file(junk, "app_junk")
    assert not app_db.database_exists("app_junk")


def test_names_are_validated_and_password_stays_out_of_errors(pg):
    with pytest.raises(UnsafeValueError):
        PostgresDatabase(host=pg.host, port=pg.port, user=pg.user, dbname="app; DROP")
    with pytest.raises(UnsafeValueError):
        PostgresDatabase(host="-oProxyCommand", port=pg.port, user=pg.user, dbname="conn_app")
    db = PostgresDatabase(host=pg.host, port=pg.port, user=pg.user, dbname="conn_app")
    with pytest.raises(UnsafeValueError):
        db.restore_from_file(__file__, "--clean")
    down = PostgresDatabase(
        host="127.0.0.1",
        port=23299,
        user="postgres",
        dbname="conn_app",
        password="pw-s3cret",
        connect_timeout=2,
    )
    with pytest.raises(HostUnreachable) as err:
        down.server_version()
    assert "pw-s3cret" not in str(err.value) and "23299" in str(err.value)
    assert "pw-s3cret" not in repr(down)


def _marker_db(admin: PostgresDatabase, name: str, marker: str) -> None:
    admin.drop_database(name)
    admin.create_database(name)
    admin.run_sql(f"CREATE TABLE marker AS SELECT '{marker}'::text AS m", name)


def _marker(admin: PostgresDatabase, name: str) -> str:
    return str(admin.run_sql("SELECT m FROM marker", name)[0][0])


def test_swap_is_one_transaction_and_the_target_name_never_disappears(pg):
    """Both renames commit together: while the swap waits on its second rename, another
    session still sees the target under its name; when the second rename fails, the first is
    undone with it (nothing renamed)."""
    import threading

    import psycopg

    admin = PostgresDatabase(host=pg.host, port=pg.port, user=pg.user, dbname="postgres")
    _marker_db(admin, "swap_target", "old")
    _marker_db(admin, "swap_staging", "new")
    admin.drop_database("swap_previous")
    # a session on the staging copy makes its rename wait (then fail): the window to look into
    holder = psycopg.connect(host=pg.host, port=pg.port, user=pg.user, dbname="swap_staging")
    box: dict[str, BaseException] = {}

    def swap() -> None:
        try:
            admin.swap_in("swap_staging", "swap_target", "swap_previous")
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=swap)
    try:
        thread.start()
        seen: list[str] = []
        while thread.is_alive() and not seen:
            waiting = admin.run_sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'kmp-ops'"
                " AND query LIKE 'ALTER DATABASE \"swap_staging\"%%' AND state = 'active'"
            )
            if waiting:  # the first rename is done (uncommitted), the second one waits
                seen = [
                    r[0]
                    for r in admin.run_sql(
                        "SELECT datname FROM pg_database WHERE datname LIKE 'swap\\_%%' ORDER BY 1"
                    )
                ]
        thread.join(60)
    finally:
        holder.close()
    assert seen == ["swap_staging", "swap_target"]  # swap_previous never became visible
    assert "being accessed by other users" in str(box["error"])
    assert _marker(admin, "swap_target") == "old" and _marker(admin, "swap_staging") == "new"
    assert not admin.database_exists("swap_previous")

    admin.swap_in("swap_staging", "swap_target", "swap_previous")  # nothing in the way now
    assert _marker(admin, "swap_target") == "new" and _marker(admin, "swap_previous") == "old"
    assert not admin.database_exists("swap_staging")
    for name in ("swap_target", "swap_previous"):
        admin.drop_database(name)


def test_statements_and_lock_waits_are_bounded(pg, app_db):
    """statement_timeout and lock_timeout are set on every session kmp-ops opens; running past
    them fails naming the database and what was waited for."""
    import psycopg

    db = PostgresDatabase(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        dbname="conn_app",
        statement_timeout=0.5,
        lock_timeout=0.5,
    )
    with pytest.raises(CommandTimeout, match=r"conn_app: a statement ran past 0.5s"):
        db.run_sql("SELECT pg_sleep(30)")
    patient = PostgresDatabase(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        dbname="conn_app",
        statement_timeout=60,
        lock_timeout=0.5,
    )
    with psycopg.connect(host=pg.host, port=pg.port, user=pg.user, dbname="conn_app") as other:
        other.execute("LOCK TABLE public.customers IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(ConnectorError, match=r"conn_app: waited more than 0.5s for a lock"):
            patient.table_row_counts()
    assert patient.table_row_counts() == EXPECTED  # the lock is gone with the other session


def test_sqlite_online_backup(tmp_path):
    src = tmp_path / "records.db"
    conn = sqlite3.connect(src)
    conn.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, entry TEXT)")
    conn.executemany("INSERT INTO audit (entry) VALUES (?)", [(f"e{i}",) for i in range(2500)])
    conn.execute('CREATE TABLE "odd ""name""" (x)')
    conn.execute('INSERT INTO "odd ""name""" VALUES (1)')
    conn.commit()
    db = SQLiteDatabase(src)
    dest = db.backup_to(tmp_path / "backup" / "records.db")
    conn.execute("INSERT INTO audit (entry) VALUES ('after')")
    conn.commit()
    conn.close()
    assert SQLiteDatabase(dest).table_row_counts() == {"audit": 2500, 'odd "name"': 1}
    assert db.table_row_counts()["audit"] == 2501
    assert [p.name for p in dest.parent.iterdir()] == ["records.db"]
    with pytest.raises(ConnectorError):
        SQLiteDatabase(tmp_path / "missing.db").backup_to(tmp_path / "x.db")
