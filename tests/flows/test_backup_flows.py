"""Backup → verify → restore and retention, end to end on the real stack.

Real PostgreSQL, real SeaweedFS S3, real sshd hosts, real Prefect server; ``pg_restore`` and
boto3 are used by the tests themselves as independent witnesses.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from tests.flows.backup_fixtures import (
    TABLES,
    api_url,
    drop_env,
    latest_artifact,
    make_env,
    run_in_thread,
    s3_client,
    seed_database,
    sha256,
    tree,
    wait_for,
)

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

OWN_S3_PORT = 25800  # a test-owned SeaweedFS, stopped mid-upload


@pytest.fixture
def bk(stack, tmp_path, monkeypatch):
    env = make_env(stack, tmp_path)
    seed_database(env)
    monkeypatch.setenv("KMPOPS_CONFIG", str(env.ops_yaml))
    yield env
    drop_env(env)


def _completed(rec, kind="database"):
    return [b for b in rec.backups(kind=kind) if b.state == "complete"]


def _pg_restore_witness(bk, dump_bytes: bytes, name: str) -> str:
    """Restore ``dump_bytes`` with plain ``pg_restore`` (the test's own witness) into a new
    database ``<dbname>_<name>``; return that database's name. Fails if pg_restore fails.
    """
    if dump_bytes[:4] == b"\x28\xb5\x2f\xfd":  # a zstd frame (the default compression)
        import zstandard

        dump_bytes = zstandard.ZstdDecompressor().stream_reader(dump_bytes).read()
    assert dump_bytes[:5] == b"PGDMP"
    dump = bk.root / f"{name}.dump"
    dump.write_bytes(dump_bytes)
    restored = f"{bk.dbname}_{name}"
    with bk.pg("postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{restored}"')
    subprocess.run(
        [
            "pg_restore",
            "-h",
            "127.0.0.1",
            "-p",
            str(bk.pg_port),
            "-U",
            "postgres",
            "-d",
            restored,
            "--no-owner",
            str(dump),
        ],
        check=True,
        capture_output=True,
    )
    return restored


def test_backup_matches_manifest_and_plain_pg_restore(bk):
    from flows.backup_database import backup_database

    [manifest] = backup_database(["shop"])
    data = bk.object_bytes(manifest["object_key"])
    assert sha256(data) == manifest["sha256"] and len(data) == manifest["size"]
    assert manifest["table_row_counts"] == {f"public.{t}": n for t, n in TABLES.items()}
    # the manifest is stored beside the dump and in the catalog
    stored = bk.object_bytes(manifest["object_key"].removesuffix(".dump") + ".manifest.json")
    assert f'"sha256": "{manifest["sha256"]}"' in stored.decode()
    [row] = _completed(bk.records())
    assert row.sha256 == manifest["sha256"] and row.size == manifest["size"]

    # plain pg_restore, run by the test, restores it with the same row counts
    restored = _pg_restore_witness(bk, data, "witness")
    assert bk.counts(restored) == bk.counts(bk.dbname) == TABLES


def _flip_one_byte(bk, key: str, dbname: str) -> bytes:
    """Flip one byte inside the archive header's database name (pg_restore ignores it)."""
    data = bytearray(bk.object_bytes(key))
    pos = bytes(data[:512]).index(dbname.encode()) + 3
    data[pos] ^= 0x20
    bk.s3.put_object(Bucket=bk.bucket, Key=key, Body=bytes(data))
    return bytes(data)


def test_flipped_byte_fails_verification_and_restore_needs_force_and_approval(bk):
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups
    from kmpops.connectors.notify import read_sink
    from kmpops.errors import IntegrityError, PolicyViolation
    from kmpops.records.models import Backup

    # pg_dump's own format, whose header holds the database name in clear (the byte to flip);
    # verification compares the object's sha256, whatever the format
    cfg = yaml.safe_load(bk.ops_yaml.read_text())
    cfg["backups"]["database"]["compression"] = "pg_dump"
    bk.ops_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    [good] = backup_database(["shop"])
    summary = verify_backups(databases=["shop"], hosts=[])
    assert summary["verified"] == [good["record_id"]] and summary["failed"] == []
    [bad] = backup_database(["shop"])
    _flip_one_byte(bk, bad["object_key"], bk.dbname)

    with pytest.raises(IntegrityError, match="1 backup"):
        verify_backups(databases=["shop"], hosts=[])
    rec = bk.records()
    assert rec.backup(bad["record_id"]).verification == "failed"
    assert rec.backup(good["record_id"]).verification == "verified"
    with rec.session() as session:
        [verification] = session.get(Backup, bad["record_id"]).verifications
        assert not verification.checks["integrity"]["ok"]
    table = latest_artifact("verify-backups")
    assert table["type"] == "table"
    rows = json.loads(table["data"])
    assert {
        (r["backup"], r["integrity"], r["result"]) for r in rows if r["kind"] == "database"
    } == {(bad["record_id"], "FAIL", "FAILED")}
    notes = read_sink(bk.notifications)
    assert any(n["severity"] == "critical" and "verification failed" in n["title"] for n in notes)
    assert rec.audit_events(action="backup.verification_failed")

    # default restore picks the newest *verified* backup, never the failed one
    target = bk.dbname + "_restore_copy"
    result = restore_database("shop", target_dbname=target)
    assert result["backup"] == good["record_id"] and result["row_counts_match"]

    # asking for the failed one is refused, and refused again if the approver says no
    with pytest.raises(PolicyViolation, match="failed verification"):
        restore_database("shop", backup_id=bad["record_id"], target_dbname=bk.dbname + "_restore_x")

    def answer(decision: str):
        return _run_answering_approval(
            bk,
            restore_database,
            "shop",
            decision=decision,
            approver="alice",
            reason="test",
            backup_id=bad["record_id"],
            target_dbname=bk.dbname + "_restore_forced",
            force=True,
            requested_by="dave",
        )

    box = answer("reject")
    assert isinstance(box.get("error"), PolicyViolation)
    box = answer("approve")
    assert "error" not in box, box.get("error")
    assert box["result"]["backup"] == bad["record_id"]
    assert bk.counts(bk.dbname + "_restore_forced") == TABLES


def _paused(flow_run_id: str) -> bool:
    import httpx

    state = httpx.get(f"{api_url()}/flow_runs/{flow_run_id}", timeout=5).json()["state"]
    return state["type"] == "PAUSED"


def _confirm_as_requester(bk, run_id: str, requester: str) -> None:
    """The requester confirms the paused request with their own token (the first answer a
    request waits for); returns once the run waits again, for its approvers."""
    from kmpops.approve import approve_run

    approve_run(
        api_url(),
        run_id,
        decision="confirm",
        approver=requester,
        reason="",
        token=bk.token(requester),
    )
    wait_for(
        lambda: [
            a
            for a in bk.records().approvals(run_id=run_id)
            if a.details.get("kind") == "answer" and a.approver == requester
        ],
        timeout=30,
    )
    wait_for(lambda: _paused(run_id), timeout=30)


def _run_answering_approval(bk, flow, *args, decision: str, approver: str, reason: str, **kwargs):
    """Run ``flow(*args, **kwargs)`` in a thread, answer its pending approval request with
    ``decision`` as ``approver`` once the run is paused, and return the thread's result box
    (``result`` or ``error``); fails if the flow did not finish within 120 s of the answer.
    """
    from kmpops.approve import approve_run

    thread, box = run_in_thread(flow, *args, **kwargs)
    request = wait_for(
        lambda: [
            a
            for a in bk.records().approvals()
            if a.details.get("kind") == "request" and a.outcome == "pending"
        ],
        timeout=90,
    )
    wait_for(lambda: _paused(request[-1].run_id), timeout=30)
    _confirm_as_requester(bk, request[-1].run_id, kwargs["requested_by"])
    approve_run(
        api_url(),
        request[-1].run_id,
        decision=decision,
        approver=approver,
        reason=reason,
        token=bk.token(approver),
    )
    thread.join(120)
    assert box, f"{flow.name} did not finish after the answer"
    return box


def test_s3_stopped_mid_upload_records_nothing_complete(stack, tmp_path, monkeypatch):
    from flows.backup_database import backup_database
    from kmpops.stack import seaweed
    from kmpops.stack._proc import stop_process

    s3_root = tmp_path / "own-s3"
    info = seaweed.start(s3_root, OWN_S3_PORT)
    env = make_env(stack, tmp_path, s3_endpoint=info.endpoint_url, s3_root=s3_root)
    try:
        seed_database(env, big_rows=800)  # ~26 MB of incompressible rows
        monkeypatch.setenv("KMPOPS_CONFIG", str(env.ops_yaml))
        thread, box = run_in_thread(backup_database, ["shop"])
        wait_for(
            lambda: [b for b in env.records().backups() if b.state == "running"],
            timeout=60,
            interval=0.02,
        )
        time.sleep(0.3)  # pg_dump is streaming into the multipart upload now
        stop_process(info.pid_file)
        thread.join(180)
        assert isinstance(box.get("error"), Exception), box
        rows = env.records().backups()
        assert rows and all(r.state == "failed" for r in rows), [(r.id, r.state) for r in rows]
        assert len(rows) >= 2  # the transient failure was retried
        # back up on other ports (the old ones sit in TIME_WAIT), same data: nothing was stored
        again = seaweed.start(s3_root, OWN_S3_PORT + 50)
        env.s3 = s3_client(again.endpoint_url, s3_root)
        assert env.keys("database/") == []
    finally:
        seaweed.stop(s3_root)
        drop_env(env)


def test_incremental_configuration_and_point_in_time_restore(bk):
    from flows.backup_configuration import backup_configuration
    from flows.restore_configuration import restore_configuration

    host = "stg-1"
    conf = bk.config_dirs[host]
    (conf / "sub").mkdir(parents=True)
    (conf / "app.conf").write_text("listen = 8080\n")
    (conf / "secrets.env").write_text("TOKEN_FILE=/run/token\n")
    (conf / "sub" / "features.yaml").write_text("new_checkout: false\n")
    (conf / "secrets.env").chmod(0o600)

    [run1] = backup_configuration(hosts=[host])
    assert (run1["files"], run1["uploaded"]) == (3, 3)
    before = tree(conf)

    (conf / "sub" / "features.yaml").write_text("new_checkout: true\n")
    [run2] = backup_configuration(hosts=[host])
    assert (run2["files"], run2["uploaded"]) == (3, 1)
    rec = bk.records()
    manifest2 = rec.backup(run2["record_id"]).manifest
    assert manifest2["uploaded_blobs"] == [
        f"config/blobs/sha256/{h[:2]}/{h}" for h in [sha256(b"new_checkout: true\n")]
    ]
    after = tree(conf)

    (conf / "stray.conf").write_text("not in any backup\n")
    restore_configuration(host, backup_id=run1["record_id"], requested_by="dave")
    assert tree(conf) == before
    restore_configuration(host, backup_id=run2["record_id"], requested_by="dave")
    assert tree(conf) == after
    # each restore took a safety backup of what was there first
    assert len(_completed(rec, "configuration")) == 4


def test_retention_deletes_expired_and_keeps_last_verified(bk):
    from flows.backup_configuration import backup_configuration
    from flows.backup_database import backup_database
    from flows.backup_retention import backup_retention
    from flows.verify_backups import verify_backups

    first = backup_database(["shop"])[0]
    second = backup_database(["shop"])[0]
    verify_backups(databases=["shop"], hosts=[])
    third = backup_database(["shop"])[0]  # newest, not verified yet

    conf = bk.config_dirs["stg-1"]
    conf.mkdir(parents=True)
    (conf / "a.conf").write_text("a = 1\n")
    (conf / "b.conf").write_text("b = 1\n")
    cfg1 = backup_configuration(hosts=["stg-1"])[0]
    (conf / "b.conf").write_text("b = 2\n")
    cfg2 = backup_configuration(hosts=["stg-1"])[0]
    verify_backups(databases=[], hosts=["stg-1"])

    # as_of may not lie in the future (a parameter only narrows): shorten the configured
    # retention instead, so that every backup taken above is expired now
    data = yaml.safe_load(bk.ops_yaml.read_text())
    for kind in ("database", "configuration"):
        data["backups"][kind]["retention"] = "1s"
    bk.ops_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    time.sleep(1.5)
    plan = backup_retention(dry_run=True)
    assert sorted(plan["delete"]) == sorted([first["record_id"], cfg1["record_id"]])
    assert plan["deleted"] == {"backups": 0, "blobs": 0}

    done = backup_retention()
    # b.conf's old content is unreferenced now but younger than the blob grace period (6h), so
    # it stays; "orphan older than grace is deleted" is a case of tests/unit/test_retention_plan
    assert done["deleted"] == {"backups": 2, "blobs": 0}
    rec = bk.records()
    assert rec.backup(first["record_id"]).state == "deleted"
    for kept in (second, third):
        assert rec.backup(kept["record_id"]).state == "complete"
    assert first["object_key"] not in bk.keys("database/")
    assert second["object_key"] in bk.keys("database/")
    blobs = bk.keys("config/blobs/")
    assert blobs == sorted(
        f"config/blobs/sha256/{h[:2]}/{h}"
        for h in (sha256(b"a = 1\n"), sha256(b"b = 1\n"), sha256(b"b = 2\n"))
    )
    assert rec.backup(cfg2["record_id"]).state == "complete"

    # once the newest is verified, the previously last verified one may go
    # (with retention 1s the previously last verified one is due at once: the compliance check
    # says so, since this verification does not apply retention itself)
    from kmpops.errors import IntegrityError

    with pytest.raises(IntegrityError, match=r"0 backup\(s\) failed verification, 1 compliance"):
        verify_backups(databases=["shop"], hosts=[], apply_retention=False)
    done = backup_retention()
    assert done["delete"] == [second["record_id"]]
    assert rec.backup(third["record_id"]).state == "complete"


def test_restore_over_existing_production_database_needs_approval_and_takes_safety_backup(bk):
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups
    from kmpops.approve import approve_run

    [good] = backup_database(["shop"])
    verify_backups(databases=["shop"], hosts=[])
    with bk.pg() as conn:
        conn.execute("DELETE FROM order_lines")  # the accident the restore repairs

    thread, box = run_in_thread(
        restore_database, "shop", environment="production", requested_by="dave"
    )
    request = wait_for(
        lambda: [a for a in bk.records().approvals() if a.details.get("kind") == "request"],
        timeout=90,
    )
    wait_for(lambda: _paused(request[-1].run_id), timeout=30)
    _confirm_as_requester(bk, request[-1].run_id, "dave")
    approve_run(
        api_url(),
        request[-1].run_id,
        decision="approve",
        approver="bob",
        reason="restore after accidental delete",
        token=bk.token("bob"),
    )
    thread.join(120)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result["backup"] == good["record_id"] and result["row_counts_match"]
    assert bk.counts(bk.dbname) == TABLES
    assert bk.counts(result["previous_dbname"])["order_lines"] == 0  # kept, renamed
    safety = bk.records().backup(result["safety_backup"])
    assert safety.state == "complete"
    assert safety.manifest["table_row_counts"]["public.order_lines"] == 0


def test_row_counts_are_taken_in_the_dump_snapshot(bk):
    """Rows committed while the dump runs are in neither the dump nor the manifest's counts."""
    import threading

    from flows.backup_database import backup_database

    stop = threading.Event()

    def writer() -> None:
        with bk.pg(autocommit=True) as conn:
            next_id = 100_000
            while not stop.is_set():
                conn.execute("INSERT INTO customers VALUES (%s, 'late')", (next_id,))
                next_id += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        [manifest] = backup_database(["shop"])
    finally:
        stop.set()
        thread.join(10)
    assert bk.counts(bk.dbname)["customers"] > manifest["table_row_counts"]["public.customers"]
    restored = _pg_restore_witness(bk, bk.object_bytes(manifest["object_key"]), "snap")
    counts = {f"public.{t}": n for t, n in bk.counts(restored).items()}
    assert counts == manifest["table_row_counts"]


def test_restore_configuration_in_production_waits_for_approval(bk):
    from flows.backup_configuration import backup_configuration
    from flows.restore_configuration import restore_configuration
    from kmpops.errors import PolicyViolation

    host = "prd-1"
    conf = bk.config_dirs[host]
    conf.mkdir(parents=True)
    (conf / "app.conf").write_text("workers = 4\n")
    [run1] = backup_configuration(hosts=[host])
    (conf / "app.conf").write_text("workers = 400\n")

    def restore_with(decision: str) -> dict:
        return _run_answering_approval(
            bk,
            restore_configuration,
            host,
            decision=decision,
            approver="carol",
            reason="config rollback",
            backup_id=run1["record_id"],
            requested_by="dave",
        )

    box = restore_with("reject")
    assert isinstance(box.get("error"), PolicyViolation)
    assert (conf / "app.conf").read_text() == "workers = 400\n"  # untouched
    box = restore_with("approve")
    assert "error" not in box, box.get("error")
    assert (conf / "app.conf").read_text() == "workers = 4\n"
    assert box["result"]["safety_backup"] is not None


def test_restore_failing_a_sanity_query_never_goes_live(bk):
    """The sanity queries run on the restored copy before the swap: one that fails there keeps
    the target as it is, drops the copy, and the run names the query; the refusal is audited."""
    import yaml

    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from kmpops.errors import IntegrityError

    cfg = yaml.safe_load(bk.ops_yaml.read_text())
    cfg["environments"]["development"] = {"hosts": [], "policy": {}}
    cfg["databases"]["shop"]["environment"] = "development"
    cfg["databases"]["shop"]["sanity_queries"].append("SELECT count(*) > 5000 FROM customers")
    bk.ops_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    [manifest] = backup_database(["shop"])
    with bk.pg() as conn:
        conn.execute("INSERT INTO customers SELECT g, 'new' FROM generate_series(2001, 6000) g")

    with pytest.raises(IntegrityError, match=r"sanity query failed: SELECT count\(\*\) > 5000"):
        restore_database("shop", backup_id=manifest["record_id"])
    assert bk.counts(bk.dbname)["customers"] == 6000  # the target kept its rows
    with bk.pg("postgres") as conn:
        copies = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (bk.dbname + "\\_\\_%",)
        ).fetchall()
    assert copies == []
    [event] = bk.records().audit_events(action="backup.restore_failed")
    assert "sanity query failed" in event.details["error"]
