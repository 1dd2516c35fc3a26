"""Backups as data: manifests, object keys, restore points, RPO/RTO and the drill report.

No Prefect. The I/O functions take live connectors (an ObjectStore, an SSHConnection, a
``PostgresDatabase`` / ``SQLiteDatabase``) and never build them; all PostgreSQL work goes through
``kmpops.connectors.database``.

Object layout in the store::

    database/<name>/<YYYYmmddTHHMMSSZ>-<backup_id>.dump            the pg_dump -Fc stream
    database/<name>/<YYYYmmddTHHMMSSZ>-<backup_id>.manifest.json   its DatabaseManifest
    config/blobs/sha256/<ab>/<sha256>                              one file content, by hash
    config/manifests/<host>/<YYYYmmddTHHMMSSZ>-<backup_id>.json    a ConfigurationManifest

A database manifest is written only after the dump object's upload is confirmed, so a manifest
beside a dump means the dump was complete at upload time; the catalog (records) is the authority.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kmpops.connectors.database import PostgresDatabase, SQLiteDatabase
from kmpops.errors import CommandFailed, ConnectorError, IntegrityError, NotFound, Unsupported
from kmpops.plans.recovery import previous_copy_name, staging_copy_name

__all__ = [
    "BLOB_PREFIX",
    "ConfigFileEntry",
    "ConfigurationManifest",
    "DatabaseManifest",
    "DrillOutcome",
    "RestoreCandidate",
    "backup_database",
    "blob_key",
    "blobs_to_upload",
    "choose_restore_point",
    "collect_configuration",
    "config_manifest_key",
    "database_object_keys",
    "download_bytes",
    "new_backup_id",
    "parse_listing",
    "render_drill_report",
    "restore_configuration_files",
    "restore_into",
    "restore_test",
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


# -- configuration backups over SSH -----------------------------------------------------------
#
# The I/O below takes live connector objects (an SSHConnection, an ObjectStore) and is called by
# tasks; it never builds them itself.

_SHA_MARK = "\x00--kmpops-sha256--\x00"
_MISSING_MARK = "\x00--kmpops-missing--\x00"


def _listing_command(roots: Sequence[str]) -> str:
    """One remote shell command listing regular files (mode, owner, group, size, path) and hashes.

    Roots are validated (``shellsafe.validate_path``) and quoted; the output is NUL-separated so
    any file name parses. Symlinks and special files are not followed or collected.
    """
    from kmpops import shellsafe

    if not roots:
        raise ValueError("no configuration paths to collect")
    quoted = []
    for root in roots:
        if not root.startswith("/"):
            raise ValueError(f"configuration path {root!r} must be absolute")
        quoted.append(shellsafe.quote(shellsafe.validate_path(root, what="configuration path")))
    existing = " ".join(quoted)
    check = "; ".join(f"[ -e {q} ] || printf '%s\\0' {q}" for q in quoted)
    return (
        f"{check}; printf '\\0--kmpops-missing--\\0'; "
        f'for r in {existing}; do [ -e "$r" ] && find "$r" -xdev -type f '
        "-printf '%m\\t%u\\t%g\\t%s\\t%p\\0'; done; "
        "printf '\\0--kmpops-sha256--\\0'; "
        f'for r in {existing}; do [ -e "$r" ] && find "$r" -xdev -type f -print0; done '
        "| xargs -0 -r sha256sum -z; true"
    )


def parse_listing(output: str) -> tuple[list[ConfigFileEntry], list[str]]:
    """Parse the output of the listing command into (file entries sorted by path, missing roots).

    Raises ValueError if the output is not in the expected shape.
    """
    if _MISSING_MARK not in output or _SHA_MARK not in output:
        raise ValueError("unexpected output from the configuration listing command")
    missing_part, rest = output.split(_MISSING_MARK, 1)
    stat_part, sha_part = rest.split(_SHA_MARK, 1)
    missing = [m for m in missing_part.split("\x00") if m]
    hashes: dict[str, str] = {}
    for item in sha_part.split("\x00"):
        if item:
            digest, _, path = item.partition("  ")
            hashes[path] = digest
    entries: dict[str, ConfigFileEntry] = {}
    for item in stat_part.split("\x00"):
        if not item:
            continue
        mode, owner, group, size, path = item.split("\t", 4)
        if path not in hashes:
            continue  # vanished between the two listings
        entries[path] = ConfigFileEntry(
            path=path,
            mode=int(mode, 8),
            owner=owner,
            group=group,
            size=int(size),
            sha256=hashes[path],
        )
    return [entries[p] for p in sorted(entries)], missing


def download_bytes(store: Any, key: str, *, expected_sha256: str | None) -> bytes:
    """An object's content, checked against ``expected_sha256`` (or its recorded sha256).

    Raises IntegrityError on a mismatch, NotFound if the object does not exist.
    """
    import io

    buffer = io.BytesIO()
    store.download(key, buffer, expected_sha256=expected_sha256)
    return buffer.getvalue()


def collect_configuration(
    conn: Any,
    store: Any,
    *,
    host: str,
    roots: Sequence[str],
    backup_id: str,
    known_blobs: Iterable[str] = (),
    timeout: float = 120.0,
) -> ConfigurationManifest:
    """Back up the files under ``roots`` on one host into content-addressed blobs.

    Lists the files and their sha256 on the host (one command), uploads only the blobs not in
    ``known_blobs`` and not already in the store, then returns the manifest (the caller stores
    it: a manifest written last means every blob it references was uploaded first). A file whose
    content changed between listing and reading is stored with the content actually read.
    Raises ConnectorError / TransientError from the connectors; nothing is left half-written
    that a manifest refers to.
    """
    started = datetime.now(UTC)
    result = conn.run(_listing_command(roots), timeout=timeout, check=True)
    entries, missing = parse_listing(result.stdout)
    stored = set(known_blobs)
    uploaded: list[str] = []
    final: list[ConfigFileEntry] = []
    for entry in entries:
        key = entry.blob_key
        if key in stored:
            final.append(entry)
            continue
        if store.exists(key):
            stored.add(key)
            final.append(entry)
            continue
        data = conn.read_bytes(entry.path)
        digest = sha256_hex(data)
        if digest != entry.sha256:
            entry = entry.model_copy(update={"sha256": digest, "size": len(data)})
            key = entry.blob_key
        if key not in stored:
            store.put_bytes(key, data)
            stored.add(key)
            uploaded.append(key)
        final.append(entry)
    return ConfigurationManifest(
        backup_id=backup_id,
        host=host,
        roots=tuple(roots),
        missing_roots=tuple(missing),
        started_at=started,
        finished_at=datetime.now(UTC),
        files=tuple(final),
        uploaded_blobs=tuple(uploaded),
    )


_OWNER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")

# Written from stdin to a fresh temp file beside the target: mktemp creates it 0600 (so the
# content is never readable by others, whatever the umask), then owner, group and mode are set
# and the content checked before one rename puts it in place. $1 path, $2 owner:group ("" keeps
# the current file's), $3 octal mode, $4 sha256.
_WRITE_SCRIPT = r"""
umask 077
path=$1 owner=$2 mode=$3 sha=$4
t=$(mktemp -- "$(dirname -- "$path")/.$(basename -- "$path").kmpops-XXXXXX") || exit 1
own() {
    if [ -n "$owner" ]; then chown -- "$owner" "$t"
    elif [ -e "$path" ]; then chown --reference="$path" -- "$t"
    fi
}
if cat > "$t" && [ "$(sha256sum < "$t" | cut -d' ' -f1)" = "$sha" ] && own \
    && chmod -- "$mode" "$t" && mv -f -- "$t" "$path"; then exit 0; fi
rm -f -- "$t"; exit 1
"""


def _same_file(now: ConfigFileEntry, entry: ConfigFileEntry) -> bool:
    same = now.sha256 == entry.sha256 and now.mode == entry.mode
    if entry.owner and entry.group:
        same = same and (now.owner, now.group) == (entry.owner, entry.group)
    return same


def write_config_file(conn: Any, entry: ConfigFileEntry, data: bytes, *, timeout: float) -> None:
    """Write one configuration file on a host as the manifest lists it, atomically.

    The content goes over the command's stdin into a temp file created with mode 0600 beside
    ``entry.path``; its sha256 is checked, then ``entry.owner``/``entry.group`` (or, for an old
    manifest without them, the current file's owner) and ``entry.mode`` are set, and a rename
    puts it in place: a reader sees the old file or the new one, never a half-written one or
    one readable by others. Raises UnsafeValueError for an owner or group that is not a plain
    name, CommandFailed if any step fails (the temp file is removed, the file is unchanged).
    """
    from kmpops.errors import UnsafeValueError

    owner = ""
    if entry.owner and entry.group:
        for what, name in (("owner", entry.owner), ("group", entry.group)):
            if not _OWNER_RE.fullmatch(name):
                raise UnsafeValueError(f"{entry.path}: {what} {name!r} is not a user/group name")
        owner = f"{entry.owner}:{entry.group}"
    # entry.path is absolute without NUL or '..' (the model checks it); it is passed as one
    # quoted argument, so any file name the backup collected can be restored
    digest = sha256_hex(data)
    conn.run(
        [
            "sh",
            "-c",
            _WRITE_SCRIPT,
            "kmpops-restore",
            entry.path,
            owner,
            f"{entry.mode:04o}",
            digest,
        ],
        stdin=data,
        timeout=timeout,
        check=True,
    )


def restore_configuration_files(
    conn: Any,
    store: Any,
    manifest: ConfigurationManifest,
    *,
    prune: bool = True,
    timeout: float = 120.0,
) -> dict[str, list[str]]:
    """Put one host's configuration files back exactly as ``manifest`` lists them.

    Every blob is downloaded and checked against its sha256 *before* any file on the host is
    touched (IntegrityError / NotFound otherwise, nothing changed). Then each file is written
    atomically with its mode, owner and group (:func:`write_config_file`: never readable by
    others on the way); with ``prune``, files under the manifest's roots that the manifest
    does not list are removed. Returns ``{"written": [...], "unchanged": [...], "removed": [...]}``.
    Rollback: the caller takes a configuration backup first and restores that on failure.
    """
    blobs: dict[str, bytes] = {}
    for entry in manifest.files:
        if entry.sha256 not in blobs:
            blobs[entry.sha256] = download_bytes(
                store, entry.blob_key, expected_sha256=entry.sha256
            )
    present_roots = [r for r in manifest.roots if r not in manifest.missing_roots]
    current: dict[str, ConfigFileEntry] = {}
    if present_roots:
        listing = conn.run(_listing_command(present_roots), timeout=timeout, check=True)
        current = {e.path: e for e in parse_listing(listing.stdout)[0]}
    outcome: dict[str, list[str]] = {"written": [], "unchanged": [], "removed": []}
    dirs = sorted({e.path.rsplit("/", 1)[0] or "/" for e in manifest.files})
    if dirs:
        conn.run(["mkdir", "-p", "--", *dirs], timeout=timeout, check=True)
    for entry in manifest.files:
        now = current.get(entry.path)
        if now is not None and _same_file(now, entry):
            outcome["unchanged"].append(entry.path)
            continue
        write_config_file(conn, entry, blobs[entry.sha256], timeout=timeout)
        outcome["written"].append(entry.path)
    if prune:
        wanted = {e.path for e in manifest.files}
        extra = sorted(p for p in current if p not in wanted)
        if extra:
            conn.run(["rm", "-f", "--", *extra], timeout=timeout, check=True)
        outcome["removed"] = extra
    return outcome


# -- database backups -------------------------------------------------------------------------
#
# All PostgreSQL work goes through ``PostgresDatabase`` (pg_dump / pg_restore with the password
# in a private passfile only, psycopg for SQL); SQLite through ``SQLiteDatabase`` (the online
# backup API).

_PG_MAX_IDENT = 63


def _checked_dbname(name: str) -> str:
    """``name`` if PostgreSQL keeps it as given (a safe name of at most 63 bytes)."""
    if len(name) > _PG_MAX_IDENT or not _NAME_RE.fullmatch(name):
        raise ValueError(f"database name {name!r} is not acceptable")
    return name


def backup_database(
    db: PostgresDatabase | SQLiteDatabase,
    store: Any,
    *,
    database: str,
    backup_id: str,
    dump_key: str,
    manifest_key: str,
    compression: Literal["none", "zstd"] = "zstd",
) -> DatabaseManifest:
    """Stream a backup of ``db`` into ``store`` at ``dump_key`` and write its manifest.

    ``compression`` (PostgreSQL only): ``"zstd"`` — ``pg_dump --compress=0`` compressed by zstd
    on the way (``ops.yaml`` ``backups.database.compression: zstd``, the default); ``"none"`` —
    no compression around pg_dump's own gzip (``compression: pg_dump``). The manifest records
    it, and :func:`restore_test` / :func:`restore_into` read it from there.

    PostgreSQL: ``PostgresDatabase.snapshot_row_counts_and_dump`` — ``pg_dump -Fc`` reads an
    exported REPEATABLE READ snapshot in which the per-table row counts are taken, so counts and
    dump agree; its stdout goes straight into a multipart upload (no temp file) and the object
    is committed only if pg_dump exited 0 (``before_commit``). The upload is then confirmed by
    ``head`` (size) before the manifest is written beside it. SQLite: the online backup API into
    a private temp file, then uploaded. Raises CommandFailed (pg_dump failed), TransientError
    (store/database unreachable), IntegrityError (stored size differs), NotFound (no SQLite
    file); the caller deletes partial objects and marks the backup failed.
    """
    if isinstance(db, SQLiteDatabase):
        return _backup_sqlite(
            db,
            store,
            database=database,
            backup_id=backup_id,
            dump_key=dump_key,
            manifest_key=manifest_key,
        )
    started = datetime.now(UTC)
    if compression not in ("none", "zstd"):
        raise ValueError(f"compression must be 'none' or 'zstd', not {compression!r}")
    snap = db.snapshot_row_counts_and_dump(
        store,
        dump_key,
        compress=compression,
        metadata={"backup-id": backup_id, "database": database},
    )
    return _finish_manifest(
        store,
        snap.put,
        manifest_key=manifest_key,
        fields={
            "backup_id": backup_id,
            "database": database,
            "dbname": db.dbname,
            "engine": "postgresql",
            "server_version": snap.server_version,
            "dump_format": "pg_dump-custom",
            "compression": compression,
            "started_at": started,
            "table_row_counts": snap.row_counts,
        },
    )


def _finish_manifest(
    store: Any, put: Any, *, manifest_key: str, fields: dict[str, Any]
) -> DatabaseManifest:
    info = store.head(put.key)
    if info is None or info.size != put.size:
        found = "missing" if info is None else f"{info.size} bytes"
        raise IntegrityError(f"upload of {put.key} not confirmed: {found}, sent {put.size}")
    manifest = DatabaseManifest(
        **fields,
        finished_at=datetime.now(UTC),
        object_key=put.key,
        size=put.size,
        sha256=put.sha256,
    )
    store.put_bytes(manifest_key, manifest.to_json_bytes())
    return manifest


def _sqlite_counts(path: Path) -> dict[str, int]:
    """Row counts of a SQLite file keyed ``main.<table>`` (the manifest's format)."""
    return {f"main.{t}": n for t, n in SQLiteDatabase(path).table_row_counts().items()}


def _backup_sqlite(
    db: SQLiteDatabase,
    store: Any,
    *,
    database: str,
    backup_id: str,
    dump_key: str,
    manifest_key: str,
) -> DatabaseManifest:
    import sqlite3

    if not db.path.is_file():
        raise NotFound(f"SQLite database {database} has no file at {db.path}")
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="kmpops-sqlite-") as tmp:
        copy = db.backup_to(Path(tmp) / "backup.sqlite")
        counts = _sqlite_counts(copy)
        with open(copy, "rb") as fh:
            put = store.put_stream(dump_key, fh, metadata={"backup-id": backup_id})
    return _finish_manifest(
        store,
        put,
        manifest_key=manifest_key,
        fields={
            "backup_id": backup_id,
            "database": database,
            "dbname": db.path.stem,
            "engine": "sqlite",
            "server_version": sqlite3.sqlite_version,
            "dump_format": "sqlite-file",
            "started_at": started,
            "table_row_counts": counts,
        },
    )


def _compare_counts(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    problems = []
    for table in sorted(set(expected) | set(actual)):
        want, got = expected.get(table), actual.get(table)
        if want != got:
            problems.append(f"{table}: manifest {want}, restored {got}")
    return problems


def restore_test(
    db: PostgresDatabase | SQLiteDatabase,
    local: Path,
    *,
    manifest: DatabaseManifest,
    scratch_name: str,
    sanity_queries: Sequence[str] = (),
) -> dict[str, Any]:
    """Restore ``local`` into scratch database ``scratch_name``, compare row counts with the
    manifest, run ``sanity_queries`` (each must return a row whose first value is truthy), and
    always drop the scratch database. Returns a check dict ``{"ok", "detail", ...}``; a failure
    of the restore itself is reported in it, not raised (TransientError is raised, and so is
    ConnectorError if ``scratch_name`` already exists — it is then left alone).
    """
    started = time.monotonic()
    if manifest.engine == "sqlite":
        return _sqlite_restore_test(local, manifest, sanity_queries)
    if not isinstance(db, PostgresDatabase):
        raise TypeError(f"a PostgreSQL backup needs a PostgresDatabase, not {db!r}")
    scratch = _checked_dbname(scratch_name)
    db.create_database(scratch)  # before the try: an existing database is never dropped
    try:
        try:
            db.restore_from_file(
                local, scratch, jobs=2, create=False, compression=manifest.compression
            )
        except CommandFailed as exc:
            return {"ok": False, "detail": str(exc), "seconds": time.monotonic() - started}
        counts = db.table_row_counts(scratch)
        with db.connect(scratch) as conn:
            sanity = _run_sanity(conn, sanity_queries)
    finally:
        db.drop_database(scratch)
    problems = _compare_counts(manifest.table_row_counts, counts) + [
        f"sanity query failed: {q}" for q, ok in sanity.items() if not ok
    ]
    return {
        "ok": not problems,
        "detail": "; ".join(problems[:5])
        if problems
        else (
            f"{len(counts)} tables, {sum(counts.values())} rows match; "
            f"{len(sanity)} sanity queries ok"
        ),
        "tables": len(counts),
        "rows": sum(counts.values()),
        "seconds": round(time.monotonic() - started, 3),
    }


def _run_sanity(conn: Any, queries: Sequence[str]) -> dict[str, bool]:
    results: dict[str, bool] = {}
    for query in queries:
        try:
            row = conn.execute(query).fetchone()
            results[query] = bool(row and row[0])
        except Exception:  # a failing query is a failed check, recorded as such
            conn.rollback()
            results[query] = False
    return results


def _sqlite_restore_test(
    local: Path, manifest: DatabaseManifest, sanity_queries: Sequence[str]
) -> dict[str, Any]:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{local}?mode=ro", uri=True)) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            sanity = _run_sanity(conn, sanity_queries)
        counts = _sqlite_counts(local)
    except (sqlite3.DatabaseError, ConnectorError) as exc:
        return {"ok": False, "detail": f"not a readable SQLite database: {exc}"}
    problems = _compare_counts(manifest.table_row_counts, counts)
    if check != "ok":
        problems.append(f"integrity_check: {check}")
    problems += [f"sanity query failed: {q}" for q, ok in sanity.items() if not ok]
    return {
        "ok": not problems,
        "detail": "; ".join(problems[:5]) or "integrity ok, counts match",
        "tables": len(counts),
        "rows": sum(counts.values()),
    }


def restore_into(
    db: PostgresDatabase | SQLiteDatabase,
    local: Path,
    *,
    manifest: DatabaseManifest,
    target_dbname: str,
    replace: bool,
    sanity_queries: Sequence[str] = (),
    label: str = "the backup",
) -> dict[str, Any]:
    """Restore ``local`` into ``target_dbname``; it goes live only once it is proven.

    The dump goes into a fresh staging database (``<target>__restoring_<time>``). There, before
    anything else changes, every table's row count is compared with the manifest and every
    sanity query must return a truthy first value (each bounded by the connector's statement
    timeout). Only then (``replace``) is the target swapped out in one transaction
    (``PostgresDatabase.swap_in``): the target becomes ``<target>__pre_<time>`` (kept for
    ``keep_previous_copies``; renaming it back undoes the restore) and the staging database
    takes its name. Without an existing target the staging database is simply renamed.

    Raises IntegrityError naming each count difference or failed sanity query (the target is
    untouched, the unproven copy dropped), ValueError if the target exists and ``replace`` is
    False, CommandFailed / CommandTimeout if pg_restore fails or runs past its bound,
    ConnectorError if the swap cannot be done (nothing renamed). On every failure the staging
    database is dropped and the target keeps its name and its data.
    """
    if not isinstance(db, PostgresDatabase):
        raise Unsupported("restore of SQLite backups: copy the verified file in place")
    target = _checked_dbname(target_dbname)
    exists = db.database_exists(target)
    if exists and not replace:
        raise ValueError(f"database {target} exists; replacing it was not allowed")
    now = datetime.now(UTC)
    staging = _checked_dbname(staging_copy_name(target, now))
    previous = _checked_dbname(previous_copy_name(target, now)) if exists else None
    db.create_database(staging)
    try:
        db.restore_from_file(local, staging, jobs=2, create=False, compression=manifest.compression)
        counts = db.table_row_counts(staging)
        with db.connect(staging) as conn:
            sanity = _run_sanity(conn, sanity_queries)
        problems = _compare_counts(manifest.table_row_counts, counts) + [
            f"sanity query failed: {q}" for q, ok in sanity.items() if not ok
        ]
        if problems:
            raise IntegrityError(
                f"restore of {label} into {target} not proven, so it did not go live: "
                + "; ".join(problems[:10])
                + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                + f". {target} is unchanged; the restored copy was dropped"
            )
        db.swap_in(staging, target, previous)
    except BaseException:
        with contextlib.suppress(Exception):
            db.drop_database(staging)
        raise
    return {
        "target": target,
        "previous_dbname": previous,
        "row_counts": counts,
        "row_counts_match": True,
        "sanity_queries": len(sanity),
        "problems": [],
    }
