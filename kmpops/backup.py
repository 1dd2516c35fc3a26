"""Backups as data: manifests, object keys, restore points, RPO/RTO and the drill report.

Pure code apart from (de)serialising manifests; no network I/O, no Prefect.

Object layout in the store::

    database/<name>/<YYYYmmddTHHMMSSZ>-<backup_id>.dump            the pg_dump -Fc stream
    database/<name>/<YYYYmmddTHHMMSSZ>-<backup_id>.manifest.json   its DatabaseManifest
    config/blobs/sha256/<ab>/<sha256>                              one file content, by hash
    config/manifests/<host>/<YYYYmmddTHHMMSSZ>-<backup_id>.json    a ConfigurationManifest

A database manifest is written only after the dump object's upload is confirmed, so a manifest
beside a dump means the dump was complete at upload time; the catalog (records) is the authority.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kmpops.errors import NotFound

__all__ = [
    "BLOB_PREFIX",
    "ConfigFileEntry",
    "ConfigurationManifest",
    "DatabaseManifest",
    "DrillOutcome",
    "RestoreCandidate",
    "blob_key",
    "blobs_to_upload",
    "choose_restore_point",
    "config_manifest_key",
    "database_object_keys",
    "new_backup_id",
    "render_drill_report",
    "rpo_of",
    "schedule_period",
    "sha256_hex",
]

BLOB_PREFIX = "config/blobs/sha256/"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def sha256_hex(data: bytes) -> str:
    """The lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def new_backup_id(now: datetime | None = None) -> str:
    """A sortable, unique backup id: ``YYYYmmddTHHMMSSZ-<8 hex>``."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _checked_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a valid name ([A-Za-z0-9][A-Za-z0-9._-]*)")
    return name


def blob_key(sha256: str) -> str:
    """The content-addressed key of a configuration blob: ``config/blobs/sha256/<ab>/<hash>``.

    Raises ValueError if ``sha256`` is not 64 lowercase hex digits.
    """
    if not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{BLOB_PREFIX}{sha256[:2]}/{sha256}"


def database_object_keys(database: str, backup_id: str) -> tuple[str, str]:
    """``(dump_key, manifest_key)`` of a database backup. Raises ValueError on a bad name."""
    base = f"database/{_checked_name(database, 'database')}/{_checked_name(backup_id, 'backup id')}"
    return f"{base}.dump", f"{base}.manifest.json"


def config_manifest_key(host: str, backup_id: str) -> str:
    """The key of one host's configuration manifest. Raises ValueError on a bad name."""
    return (
        f"config/manifests/{_checked_name(host, 'host')}/"
        f"{_checked_name(backup_id, 'backup id')}.json"
    )


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys) of the manifest."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> _Manifest:
        """Parse a manifest; raises pydantic.ValidationError if it is not one."""
        return cls.model_validate_json(data)


class DatabaseManifest(_Manifest):
    """What one database backup holds and how to check it."""

    format_version: Literal[1] = 1
    backup_id: str
    database: str = Field(description="name of the database in ops.yaml")
    dbname: str
    engine: Literal["postgresql", "sqlite"]
    server_version: str = ""
    dump_format: Literal["pg_dump-custom", "sqlite-file"] = "pg_dump-custom"
    compression: Literal["none", "zstd"] = "none"
    started_at: datetime
    finished_at: datetime
    object_key: str
    size: int = Field(ge=0)
    sha256: str
    table_row_counts: dict[str, int] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256_RE.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class ConfigFileEntry(_Manifest):
    """One file of a host's configuration at backup time."""

    path: str
    mode: int = Field(ge=0, le=0o7777, description="permission bits, e.g. 0o640")
    owner: str = ""
    group: str = ""
    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256_RE.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\x00" in value or "/../" in value + "/":
            raise ValueError("path must be absolute, without NUL or '..'")
        return value

    @property
    def blob_key(self) -> str:
        """Where this file's content is stored."""
        return blob_key(self.sha256)


class ConfigurationManifest(_Manifest):
    """The configuration files of one host as of one backup run."""

    format_version: Literal[1] = 1
    backup_id: str
    host: str
    roots: tuple[str, ...] = Field(description="configured paths collected (rendered)")
    missing_roots: tuple[str, ...] = ()
    started_at: datetime
    finished_at: datetime
    files: tuple[ConfigFileEntry, ...] = ()
    uploaded_blobs: tuple[str, ...] = Field(
        default=(), description="blob keys this run uploaded (the rest were already stored)"
    )

    @property
    def blob_keys(self) -> frozenset[str]:
        """Every blob this manifest references."""
        return frozenset(f.blob_key for f in self.files)

    @property
    def total_size(self) -> int:
        """Sum of the file sizes."""
        return sum(f.size for f in self.files)


def blobs_to_upload(files: Iterable[ConfigFileEntry], stored: Iterable[str]) -> list[str]:
    """The sha256 digests among ``files`` whose blob is not in ``stored`` (blob keys), deduplicated.

    This is what makes configuration backups incremental: content already stored (from any
    previous run or host) is referenced, not uploaded again.
    """
    have = set(stored)
    wanted: list[str] = []
    seen: set[str] = set()
    for entry in files:
        key = entry.blob_key
        if key not in have and entry.sha256 not in seen:
            seen.add(entry.sha256)
            wanted.append(entry.sha256)
    return wanted


class RestoreCandidate(BaseModel):
    """A backup as the catalog sees it, for choosing a restore point."""

    model_config = ConfigDict(frozen=True)

    backup_id: str
    subject: str
    created_at: datetime
    complete: bool
    verified: bool | None = None


def choose_restore_point(
    candidates: Sequence[RestoreCandidate],
    *,
    subject: str,
    backup_id: str | None = None,
    at: datetime | None = None,
    allow_unverified: bool = False,
) -> RestoreCandidate:
    """Pick the backup to restore.

    With ``backup_id``: that backup (must belong to ``subject`` and be complete). Otherwise the
    newest complete backup of ``subject`` created at or before ``at`` (default: any time) whose
    verification passed, or — with ``allow_unverified`` — that was not failed by verification.
    A backup whose verification *failed* is returned only when asked for by id; the caller must
    then refuse it unless a forced restore was approved. Raises NotFound when nothing fits.
    """
    mine = [c for c in candidates if c.subject == subject]
    if backup_id is not None:
        for cand in mine:
            if cand.backup_id == backup_id:
                if not cand.complete:
                    raise NotFound(f"backup {backup_id} of {subject} never completed")
                return cand
        raise NotFound(f"no backup {backup_id} of {subject}")
    usable = [
        c
        for c in mine
        if c.complete
        and (c.verified is True or (allow_unverified and c.verified is None))
        and (at is None or c.created_at <= at)
    ]
    if not usable:
        which = "verified " if not allow_unverified else ""
        when = f" at or before {at.isoformat()}" if at else ""
        raise NotFound(f"no {which}complete backup of {subject}{when}")
    return max(usable, key=lambda c: (c.created_at, c.backup_id))


def rpo_of(newest_restorable_at: datetime | None, now: datetime) -> timedelta | None:
    """The recovery point: the age of the newest restorable backup (None if there is none)."""
    if newest_restorable_at is None:
        return None
    return max(now - newest_restorable_at, timedelta(0))


def schedule_period(cron: str, *, now: datetime | None = None, samples: int = 8) -> timedelta:
    """The longest gap between consecutive runs of a cron ``schedule`` (the RPO it implies).

    Raises ValueError for an invalid cron expression.
    """
    from cronsim import CronSim, CronSimError

    start = (now or datetime.now(UTC)).astimezone(UTC).replace(second=0, microsecond=0)
    try:
        it = CronSim(cron, start)
        times = [next(it) for _ in range(samples + 1)]
    except (CronSimError, StopIteration) as exc:
        raise ValueError(f"invalid cron schedule {cron!r}: {exc}") from exc
    return max(b - a for a, b in itertools.pairwise(times))


class DrillOutcome(BaseModel):
    """One disaster-recovery drill as reported in the trend."""

    model_config = ConfigDict(frozen=True)

    started_at: datetime
    rto_seconds: float | None
    rpo_seconds: float | None
    rto_target_seconds: float
    rpo_target_seconds: float
    passed: bool
    detail: str = ""


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def render_drill_report(current: DrillOutcome, history: Sequence[DrillOutcome]) -> str:
    """Markdown for a drill: this drill against its targets, then the trend of past drills.

    ``history`` may include ``current``; it is shown newest first, at most 20 rows.
    """
    verdict = "PASSED" if current.passed else "FAILED"
    lines = [
        f"# DR drill {current.started_at:%Y-%m-%d %H:%M:%SZ} — {verdict}",
        "",
        "| measure | value | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, value, target in (
        ("RTO (time to a verified restore)", current.rto_seconds, current.rto_target_seconds),
        ("RPO (age of newest restorable backup)", current.rpo_seconds, current.rpo_target_seconds),
    ):
        met = "yes" if value is not None and value <= target else "**no**"
        lines.append(f"| {name} | {_fmt_seconds(value)} | {_fmt_seconds(target)} | {met} |")
    if current.detail:
        lines += ["", current.detail]
    rows = sorted(history, key=lambda d: d.started_at, reverse=True)[:20]
    lines += ["", "## Trend", "", "| drill | RTO | RPO | result |", "| --- | --- | --- | --- |"]
    for drill in rows:
        lines.append(
            f"| {drill.started_at:%Y-%m-%d %H:%M} | {_fmt_seconds(drill.rto_seconds)} | "
            f"{_fmt_seconds(drill.rpo_seconds)} | {'pass' if drill.passed else 'FAIL'} |"
        )
    rtos = [d.rto_seconds for d in rows if d.rto_seconds is not None]
    if len(rtos) >= 2:
        change = rtos[0] - rtos[-1]
        direction = "slower" if change > 0 else "faster"
        lines += [
            "",
            f"RTO over the last {len(rtos)} drills: {_fmt_seconds(min(rtos))} best, "
            f"{_fmt_seconds(max(rtos))} worst; latest is {_fmt_seconds(abs(change))} "
            f"{direction} than the oldest shown.",
        ]
    return "\n".join(lines) + "\n"
