"""Manifests, keys, restore points, RPO and the drill report (kmpops.backup)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from kmpops.backup import (
    ConfigFileEntry,
    ConfigurationManifest,
    DatabaseManifest,
    DrillOutcome,
    RestoreCandidate,
    blob_key,
    blobs_to_upload,
    choose_restore_point,
    config_manifest_key,
    database_object_keys,
    new_backup_id,
    render_drill_report,
    rpo_of,
    schedule_period,
    sha256_hex,
)
from kmpops.errors import NotFound

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
H1 = sha256_hex(b"one")
H2 = sha256_hex(b"two")


def entry(path, data, mode=0o640):
    return ConfigFileEntry(
        path=path, mode=mode, owner="root", group="root", size=len(data), sha256=sha256_hex(data)
    )


def test_blob_key_layout():
    assert blob_key(H1) == f"config/blobs/sha256/{H1[:2]}/{H1}"


@pytest.mark.parametrize("bad", ["", "abc", H1.upper(), H1 + "0", "../" + H1[3:]])
def test_blob_key_rejects(bad):
    with pytest.raises(ValueError, match="sha256"):
        blob_key(bad)


def test_object_keys_and_names():
    bid = new_backup_id(NOW)
    assert bid.startswith("20261127T120000Z-")
    dump, manifest = database_object_keys("app", bid)
    assert dump == f"database/app/{bid}.dump" and manifest == f"database/app/{bid}.manifest.json"
    assert config_manifest_key("stg-1", bid) == f"config/manifests/stg-1/{bid}.json"
    for bad in ("../x", "a/b", "", "-x", "a b"):
        with pytest.raises(ValueError):
            database_object_keys(bad, bid)
        with pytest.raises(ValueError):
            config_manifest_key(bad, bid)


def test_database_manifest_roundtrip_and_validation():
    m = DatabaseManifest(
        backup_id="b1",
        database="app",
        dbname="app",
        engine="postgresql",
        server_version="15.18",
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=3),
        object_key="database/app/b1.dump",
        size=123,
        sha256=H1,
        table_row_counts={"public.t": 5},
    )
    again = DatabaseManifest.from_json_bytes(m.to_json_bytes())
    assert again == m
    with pytest.raises(ValidationError):
        DatabaseManifest.model_validate({**m.model_dump(), "sha256": "nothex"})
    with pytest.raises(ValidationError):
        DatabaseManifest.model_validate({**m.model_dump(), "size": -1})
    with pytest.raises(ValidationError):
        DatabaseManifest.model_validate({**m.model_dump(), "surprise": 1})


@pytest.mark.parametrize("bad", ["relative/x", "/a/../b", "/a/\x00b", "/a/.."])
def test_config_entry_rejects_bad_paths(bad):
    with pytest.raises(ValidationError):
        ConfigFileEntry(path=bad, mode=0o644, size=1, sha256=H1)


def test_configuration_manifest_blob_keys_and_roundtrip():
    m = ConfigurationManifest(
        backup_id="c1",
        host="stg-1",
        roots=("/etc/app",),
        started_at=NOW,
        finished_at=NOW,
        files=(
            entry("/etc/app/a", b"one"),
            entry("/etc/app/b", b"two"),
            entry("/etc/app/c", b"one"),
        ),
    )
    assert m.blob_keys == {blob_key(H1), blob_key(H2)}
    assert m.total_size == 9
    assert ConfigurationManifest.from_json_bytes(m.to_json_bytes()) == m


@pytest.mark.parametrize(
    ("files", "stored", "expected"),
    [
        ([("/a", b"one"), ("/b", b"two")], [], [H1, H2]),
        ([("/a", b"one"), ("/b", b"two")], [blob_key(H1)], [H2]),
        ([("/a", b"one"), ("/b", b"one")], [], [H1]),  # same content twice: one upload
        ([("/a", b"one")], [blob_key(H1), blob_key(H2)], []),
        ([], [blob_key(H1)], []),
    ],
)
def test_blobs_to_upload(files, stored, expected):
    assert blobs_to_upload([entry(p, d) for p, d in files], stored) == expected


def cand(bid, hours_old, verified=True, complete=True, subject="app"):
    return RestoreCandidate(
        backup_id=bid,
        subject=subject,
        created_at=NOW - timedelta(hours=hours_old),
        complete=complete,
        verified=verified,
    )


CANDS = [
    cand("v-old", 48),
    cand("v-new", 24),
    cand("unverified", 12, verified=None),
    cand("failed", 6, verified=False),
    cand("partial", 1, complete=False, verified=None),
    cand("other-db", 0, subject="billing"),
]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "v-new"),
        ({"allow_unverified": True}, "unverified"),
        ({"at": NOW - timedelta(hours=30)}, "v-old"),
        ({"backup_id": "failed"}, "failed"),  # by id: caller must refuse unless forced+approved
        ({"backup_id": "v-old"}, "v-old"),
    ],
)
def test_choose_restore_point(kwargs, expected):
    assert choose_restore_point(CANDS, subject="app", **kwargs).backup_id == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backup_id": "partial"},
        {"backup_id": "nope"},
        {"backup_id": "other-db"},
        {"at": NOW - timedelta(days=5)},
    ],
)
def test_choose_restore_point_not_found(kwargs):
    with pytest.raises(NotFound):
        choose_restore_point(CANDS, subject="app", **kwargs)


def test_rpo_and_schedule_period():
    assert rpo_of(None, NOW) is None
    assert rpo_of(NOW - timedelta(hours=5), NOW) == timedelta(hours=5)
    assert rpo_of(NOW + timedelta(seconds=5), NOW) == timedelta(0)
    assert schedule_period("0 0 * * *", now=NOW) == timedelta(days=1)
    assert schedule_period("0 */6 * * *", now=NOW) == timedelta(hours=6)
    assert schedule_period("0 9 * * 1-5", now=NOW) == timedelta(days=3)
    with pytest.raises(ValueError, match="cron"):
        schedule_period("every day")


def test_drill_report_trend():
    def drill(days_ago, rto, passed=True):
        return DrillOutcome(
            started_at=NOW - timedelta(days=days_ago),
            rto_seconds=rto,
            rpo_seconds=3600.0,
            rto_target_seconds=600,
            rpo_target_seconds=90000,
            passed=passed,
        )

    current = drill(0, 30.0)
    text = render_drill_report(current, [drill(14, 50.0), drill(7, 40.0, passed=False), current])
    assert text.startswith("# DR drill 2026-11-27 12:00:00Z — PASSED")
    assert "| RTO (time to a verified restore) | 30.0 s | 10.0 min | yes |" in text
    assert text.index("2026-11-27 12:00") < text.index("2026-11-20") < text.index("2026-11-13")
    assert "FAIL" in text and "20.0 s faster" in text
    failed = DrillOutcome(
        started_at=NOW,
        rto_seconds=None,
        rpo_seconds=None,
        rto_target_seconds=1,
        rpo_target_seconds=1,
        passed=False,
    )
    assert "**no**" in render_drill_report(failed, [])


def test_parse_listing_from_a_real_shell(tmp_path):
    import os
    import subprocess

    from kmpops.backup import _listing_command, parse_listing

    root = tmp_path / "etc"
    (root / "sub").mkdir(parents=True)
    (root / "a.conf").write_bytes(b"one")
    (root / "sub" / "odd\tname with spaces").write_bytes(b"two")
    os.chmod(root / "a.conf", 0o600)
    os.symlink(root / "a.conf", root / "link.conf")  # symlinks are not collected
    out = subprocess.run(
        ["sh", "-c", _listing_command([str(root), str(tmp_path / "missing")])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files, missing = parse_listing(out)
    assert missing == [str(tmp_path / "missing")]
    assert [(f.path, f.mode, f.size, f.sha256) for f in files] == [
        (str(root / "a.conf"), 0o600, 3, H1),
        (str(root / "sub" / "odd\tname with spaces"), 0o644, 3, H2),
    ]
    with pytest.raises(ValueError, match="absolute"):
        _listing_command(["relative/path"])
    with pytest.raises(ValueError):
        _listing_command([])


def test_sqlite_backup_restore_test_and_integrity(tmp_path):
    import io
    import sqlite3

    from kmpops.backup import backup_database, restore_test
    from kmpops.connectors.database import SQLiteDatabase
    from kmpops.connectors.storage import LocalStore
    from kmpops.errors import IntegrityError

    db = tmp_path / "app.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO items (name) VALUES (?)", [(f"i{i}",) for i in range(1500)])
        conn.execute('CREATE TABLE "odd ""name""" (x)')
    store = LocalStore(tmp_path / "objects")
    endpoint = SQLiteDatabase(db)
    dump_key, manifest_key = database_object_keys("app", "b1")
    manifest = backup_database(
        endpoint,
        store,
        database="app",
        backup_id="b1",
        dump_key=dump_key,
        manifest_key=manifest_key,
    )
    assert manifest.table_row_counts == {"main.items": 1500, 'main.odd "name"': 0}
    assert manifest.engine == "sqlite" and manifest.dbname == "app"
    assert DatabaseManifest.from_json_bytes(store_bytes(store, manifest_key)) == manifest
    local = tmp_path / "restored.sqlite"
    store.download(dump_key, local, expected_sha256=manifest.sha256)
    check = restore_test(
        endpoint,
        local,
        manifest=manifest,
        scratch_name="unused",
        sanity_queries=["SELECT count(*) FROM items"],
    )
    assert check["ok"], check
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(dump_key, bytes(data))
    with pytest.raises(IntegrityError):
        store.download(dump_key, io.BytesIO(), expected_sha256=manifest.sha256)


def store_bytes(store, key):
    import io

    buf = io.BytesIO()
    store.download(key, buf)
    return buf.getvalue()
