"""``backups.database.compression``: zstd unless ops.yaml says otherwise; bad values named."""

from __future__ import annotations

import pytest

from kmpops.config import parse_config
from kmpops.errors import ConfigError

DAILY = {"schedule": "0 0 * * *", "retention": "30d", "type": "full"}


def test_database_backups_default_to_zstd() -> None:
    assert parse_config({}).database_backup_compression == "zstd"
    cfg = parse_config({"backups": {"database": DAILY}})
    assert cfg.database_backup_compression == "zstd"


def test_pg_dump_compression_can_be_chosen() -> None:
    cfg = parse_config({"backups": {"database": DAILY | {"compression": "pg_dump"}}})
    assert cfg.database_backup_compression == "pg_dump"


def test_unknown_compression_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"backups": {"database": DAILY | {"compression": "gzip"}}})
    assert any(
        p.startswith("backups.database.compression: ") and "zstd" in p and "pg_dump" in p
        for p in err.value.problems
    ), err.value.problems


def test_compression_on_configuration_backups_is_refused() -> None:
    """Configuration backups are content-addressed files: a compression there would be ignored."""
    with pytest.raises(ConfigError) as err:
        parse_config({"backups": {"configuration": DAILY | {"compression": "zstd"}}})
    assert any("compression" in p and "backups.database" in p for p in err.value.problems), (
        err.value.problems
    )
