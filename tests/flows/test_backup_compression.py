"""backup → verify → restore with ``backups.database.compression``: zstd by default, and backups
made in pg_dump's own format (earlier kmp-ops versions) still verify and restore.

Real PostgreSQL and SeaweedFS of the session stack, real Prefect flows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flows.backup_fixtures import TABLES, BackupEnv, drop_env, make_env, seed_database

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture
def bk(stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BackupEnv]:
    env = make_env(stack, tmp_path)
    seed_database(env)
    monkeypatch.setenv("KMPOPS_CONFIG", str(env.ops_yaml))
    yield env
    drop_env(env)


def _set_compression(env: BackupEnv, compression: str | None) -> None:
    cfg = yaml.safe_load(env.ops_yaml.read_text())
    entry = cfg.setdefault("backups", {}).setdefault(
        "database", {"schedule": "0 0 * * *", "retention": "30d", "type": "full"}
    )
    entry.pop("compression", None)
    if compression is not None:
        entry["compression"] = compression
    env.ops_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_default_backup_is_zstd_and_verifies_and_restores(bk: BackupEnv) -> None:
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups

    _set_compression(bk, None)
    [manifest] = backup_database(["shop"])
    assert manifest["compression"] == "zstd"
    assert bk.object_bytes(manifest["object_key"])[:4] == ZSTD_MAGIC
    summary = verify_backups(databases=["shop"], hosts=[])
    assert summary["verified"] == [manifest["record_id"]] and summary["failed"] == []

    scratch = f"{bk.dbname}_restore_zstd"
    result = restore_database("shop", target_dbname=scratch)
    assert result["row_counts_match"]
    assert bk.counts(scratch) == TABLES


def test_pg_dump_format_backup_still_verifies_and_restores_after_switch(bk: BackupEnv) -> None:
    """A backup taken with ``compression: pg_dump`` (the format before zstd became the default)
    is restored as what its manifest says, not as what ops.yaml says today."""
    from flows.backup_database import backup_database
    from flows.restore_database import restore_database
    from flows.verify_backups import verify_backups

    _set_compression(bk, "pg_dump")
    [old] = backup_database(["shop"])
    assert old["compression"] == "none"  # no compression around pg_dump's own format
    assert bk.object_bytes(old["object_key"])[:5] == b"PGDMP"

    _set_compression(bk, "zstd")
    with bk.pg() as conn:
        conn.execute("DELETE FROM order_lines WHERE id > 1000")
    [new] = backup_database(["shop"])
    assert new["compression"] == "zstd"
    summary = verify_backups(databases=["shop"], hosts=[])
    assert sorted(summary["verified"]) == sorted([old["record_id"], new["record_id"]])

    scratch = f"{bk.dbname}_restore_old"
    restore_database("shop", backup_id=old["record_id"], target_dbname=scratch)
    assert bk.counts(scratch) == TABLES  # the rows as of the old backup
    scratch_new = f"{bk.dbname}_restore_new"
    restore_database("shop", backup_id=new["record_id"], target_dbname=scratch_new)
    assert bk.counts(scratch_new) == TABLES | {"order_lines": 1000}
