"""Backup, verification, restore and retention steps: thin Prefect tasks over ``kmpops.backup``.

Every task builds its connectors from ``ops.yaml`` references (database name, host name) when it
runs, records its outcome in the records store and appends to the audit chain. Retries happen
only on TransientError; an integrity failure or a refused approval is never retried. Caching is
off everywhere: these tasks change the world.

Every wait is bounded by ``timeouts:`` in ops.yaml: connectors get the configured connect, SFTP,
lock, statement and tool bounds; each task has a ``timeout_seconds`` (the default below, the
configured ``timeouts.task`` when a flow calls it through :func:`bounded`).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from pydantic import SecretStr

from kmpops import backup as core
from kmpops.config import DatabaseConfig
from kmpops.connectors.database import PostgresDatabase, SQLiteDatabase
from kmpops.errors import ConnectorError, IntegrityError, NotFound
from kmpops.locks import database_target
from kmpops.plans.recovery import expired_previous_copies
from kmpops.records.models import Backup
from tasks.artifacts import create_table_artifact
from tasks.common import (
    audit,
    notify,
    ops_config,
    records,
    retry_on_transient,
    run_id,
    secret,
)
from tasks.locks import fence_for

__all__ = [
    "apply_retention_deletions",
    "backup_database_to_store",
    "backup_host_configuration",
    "bounded",
    "database_config",
    "drop_expired_previous_copies",
    "gather_backup_results",
    "host_config_roots",
    "hosts_with_config",
    "open_database",
    "open_object_store",
    "restore_database_backup",
    "restore_host_configuration",
    "verify_configuration_backup",
    "verify_database_backup",
]

DEFAULT_TASK_TIMEOUT_S = 8 * 3600.0  # kmpops.config.Timeouts.task's default

_RETRY = {
    "retries": 2,
    "retry_delay_seconds": [1, 3],
    "retry_condition_fn": retry_on_transient,
    "cache_policy": NO_CACHE,
    "timeout_seconds": DEFAULT_TASK_TIMEOUT_S,
}


def bounded(step: Task[Any, Any]) -> Task[Any, Any]:
    """``step`` with the configured ``timeouts.task`` as its timeout (call it from a flow).

    Prefect marks a task run past it TimedOut; the connectors' own bounds (commands, SFTP,
    locks, statements, tools) are what stop blocking I/O, and fire first.
    """
    return step.with_options(timeout_seconds=ops_config().timeouts.task.total_seconds())


# -- composition: the one place connectors are built from ops.yaml ----------------------------


def open_object_store() -> Any:
    """The object store of ``ops.yaml``'s ``storage`` section (secrets resolved here)."""
    from kmpops.connectors.storage import open_store

    cfg = ops_config()
    if cfg.storage is None:
        raise NotFound("ops.yaml has no storage section: backups have nowhere to go")
    return open_store(cfg.storage, secret)


def database_config(name: str) -> DatabaseConfig:
    """The ``databases.<name>`` entry; NotFound names the known ones."""
    cfg = ops_config()
    try:
        return cfg.databases[name]
    except KeyError:
        known = ", ".join(sorted(cfg.databases)) or "none"
        raise NotFound(f"unknown database {name!r} (known: {known})") from None


def open_database(name: str) -> PostgresDatabase | SQLiteDatabase:
    """The connector of ``databases.<name>``, its password resolved (never logged).

    Raises NotFound for an unknown name, UnsafeValueError for a host/user/dbname that may not
    reach a command line.
    """
    dbcfg = database_config(name)
    if dbcfg.kind == "sqlite":
        assert dbcfg.path is not None  # DatabaseConfig requires it for sqlite
        return SQLiteDatabase(Path(dbcfg.path))
    assert dbcfg.dbname is not None  # DatabaseConfig requires it for postgresql
    password = SecretStr(secret(dbcfg.password)) if dbcfg.password is not None else None
    return PostgresDatabase(
        host=dbcfg.host,
        port=dbcfg.port,
        user=dbcfg.user,
        dbname=dbcfg.dbname,
        password=password,
        **ops_config().timeouts.database_options(),
    )


# -- database backups ------------------------------------------------------------------------


@task(name="backup-database-to-store", **_RETRY)
def backup_database_to_store(database: str) -> dict[str, Any]:
    """Dump ``database`` straight into the object store and catalog it.

    The catalog row is ``running`` first, ``complete`` only after the upload is confirmed (the
    stored object's size matches) and the manifest is written; any failure marks the attempt
    ``failed``, removes what it uploaded and re-raises (a retry is a new attempt, a new row).
    Returns the manifest as JSON-able data plus ``record_id``.
    """
    rec = records()
    store = open_object_store()
    database_config(database)  # NotFound before anything is catalogued
    backup_id = core.new_backup_id()
    dump_key, manifest_key = core.database_object_keys(database, backup_id)
    fence = fence_for(database_target(database))
    row = rec.start_backup(
        kind="database", name=database, key=dump_key, run_id=run_id(), fence=fence
    )
    try:
        db = open_database(database)
        manifest = core.backup_database(
            db,
            store,
            database=database,
            backup_id=backup_id,
            dump_key=dump_key,
            manifest_key=manifest_key,
            compression="zstd" if ops_config().database_backup_compression == "zstd" else "none",
        )
    except BaseException as exc:
        rec.finish_backup(row.id, state="failed", manifest={"error": type(exc).__name__})
        for key in (dump_key, manifest_key):
            with contextlib.suppress(Exception):
                store.delete(key)
        audit("backup.failed", f"database/{database}", record_id=row.id, error=type(exc).__name__)
        raise
    data = manifest.model_dump(mode="json")
    rec.finish_backup(
        row.id,
        state="complete",
        size=manifest.size,
        sha256=manifest.sha256,
        manifest=data,
        fence=fence,
    )
    audit(
        "backup.completed",
        f"database/{database}",
        record_id=row.id,
        key=dump_key,
        size=manifest.size,
        sha256=manifest.sha256,
    )
    get_run_logger().info(
        "backup %s of %s: %d bytes, sha256 %s",
        backup_id,
        database,
        manifest.size,
        manifest.sha256[:12],
    )
    return {**data, "record_id": row.id}


# -- configuration backups -----------------------------------------------------------------


def host_config_roots(host: str) -> list[str]:
    """Every service's ``config_paths`` rendered for ``host`` (deduplicated, in order)."""
    cfg = ops_config()
    _, host_cfg = cfg.host(host)
    roots: list[str] = []
    for service in cfg.services.values():
        for template in service.config_paths:
            path = service.render(template, host_cfg)
            if path not in roots:
                roots.append(path)
    return roots


def hosts_with_config(environment: str | None = None) -> list[str]:
    """Names of the configured hosts (of ``environment`` only, if given) that have config paths,
    in ops.yaml order.
    """
    cfg = ops_config()
    return [
        h.name
        for env_name, env in cfg.environments.items()
        if environment is None or env_name == environment
        for h in env.hosts
        if host_config_roots(h.name)
    ]


def gather_backup_results(
    futures: Mapping[str, PrefectFuture[dict[str, Any]]],
    *,
    flow_name: str,
    subject: str,
    column: str,
    blank: Mapping[str, Any],
    columns: Callable[[dict[str, Any]], dict[str, Any]],
    description: str,
) -> list[dict[str, Any]]:
    """Wait for every backup future (``name -> future``) and report the run; return the results.

    Publishes table artifact ``flow_name`` with one row per name: ``{column: name, "result":
    ..., **columns(result)}`` or, for a failure, ``**blank``. If any failed, notifies at
    critical severity ("<subject> failed: <names>", dedup key ``<flow_name>:<names>``) and
    re-raises the first failure after every future was awaited.
    """
    done: list[dict[str, Any]] = []
    failures: list[tuple[str, Exception]] = []
    rows = []
    for name, future in futures.items():
        try:
            result = future.result()
        except Exception as exc:  # collect, report, re-raise below
            failures.append((name, exc))
            rows.append({column: name, "result": f"FAILED: {type(exc).__name__}", **blank})
            continue
        done.append(result)
        rows.append({column: name, "result": "complete", **columns(result)})
    create_table_artifact(key=flow_name, table=rows, description=description)
    if failures:
        failed = ", ".join(n for n, _ in failures)
        notify(
            "critical",
            f"{subject} failed: {failed}",
            "\n".join(f"- {n}: {type(e).__name__}: {e}" for n, e in failures),
            dedup_key=f"{flow_name}:{failed}",
        )
        raise failures[0][1]
    return done


def _latest_config_manifest(host: str) -> tuple[Backup, core.ConfigurationManifest] | None:
    for row in records().backups(kind="configuration", name=host, states=("complete",)):
        return row, core.ConfigurationManifest.model_validate(row.manifest)
    return None


@task(name="backup-host-configuration", **_RETRY)
def backup_host_configuration(host: str) -> dict[str, Any]:
    """Collect one host's configuration files into content-addressed blobs + a manifest.

    Incremental: blobs referenced by the host's previous manifest, or already in the store, are
    not uploaded again. The manifest object is written last, then the catalog row is marked
    complete. On failure the row is marked failed (uploaded blobs stay: they are harmless,
    content-addressed, and retention collects them once unreferenced). Returns a summary.
    """
    from kmpops.connectors.ssh import SSHConnection

    rec = records()
    store = open_object_store()
    cfg = ops_config()
    _, host_cfg = cfg.host(host)
    roots = host_config_roots(host)
    backup_id = core.new_backup_id()
    manifest_key = core.config_manifest_key(host, backup_id)
    previous = _latest_config_manifest(host)
    known = previous[1].blob_keys if previous else frozenset()
    row = rec.start_backup(kind="configuration", name=host, key=manifest_key, run_id=run_id())
    try:
        with SSHConnection.from_host(host_cfg, **cfg.timeouts.ssh_options()) as conn:
            manifest = core.collect_configuration(
                conn, store, host=host, roots=roots, backup_id=backup_id, known_blobs=known
            )
        body = manifest.to_json_bytes()
        store.put_bytes(manifest_key, body)
    except BaseException as exc:
        rec.finish_backup(row.id, state="failed", manifest={"error": type(exc).__name__})
        audit("backup.failed", f"configuration/{host}", record_id=row.id, error=type(exc).__name__)
        raise
    rec.finish_backup(
        row.id,
        state="complete",
        size=manifest.total_size,
        sha256=core.sha256_hex(body),
        manifest=manifest.model_dump(mode="json"),
    )
    summary = {
        "record_id": row.id,
        "backup_id": backup_id,
        "host": host,
        "files": len(manifest.files),
        "uploaded": len(manifest.uploaded_blobs),
        "bytes": manifest.total_size,
        "missing_roots": list(manifest.missing_roots),
    }
    audit("backup.completed", f"configuration/{host}", **summary)
    return summary


# -- verification ----------------------------------------------------------------------------


def _check(ok: bool, detail: str, **extra: Any) -> dict[str, Any]:
    return {"ok": ok, "detail": detail, **extra}


@task(name="verify-database-backup", **_RETRY)
def verify_database_backup(record_id: int) -> dict[str, Any]:
    """The guide's verification procedures for one database backup; records the outcome.

    Completion (object present, size as recorded), integrity (re-read, sha256 as recorded),
    restore test (into a scratch database: per-table row counts equal the manifest's, sanity
    queries return a truthy first value; the scratch database is always dropped). A failed check
    is an outcome, not an exception; only TransientError escapes (and is retried).
    """
    rec = records()
    row = rec.backup(record_id)
    manifest = core.DatabaseManifest.model_validate(row.manifest)
    store = open_object_store()
    checks: dict[str, Any] = {}
    info = store.head(row.key)
    if info is None or info.size != row.size:
        found = "missing" if info is None else f"{info.size} bytes"
        checks["completion"] = _check(False, f"object {found}, catalog says {row.size} bytes")
    else:
        checks["completion"] = _check(True, f"object present, {info.size} bytes")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kmpops-verify-") as tmp:
        local = Path(tmp) / "backup.dump"
        if checks["completion"]["ok"]:
            try:
                store.download(row.key, local, expected_sha256=row.sha256)
                checks["integrity"] = _check(True, f"sha256 {row.sha256[:16]}… matches")
            except IntegrityError as exc:
                checks["integrity"] = _check(False, str(exc))
        else:
            checks["integrity"] = _check(False, "skipped: object incomplete")
        if checks["integrity"]["ok"]:
            db = open_database(row.name)
            outcome = core.restore_test(
                db,
                local,
                manifest=manifest,
                scratch_name=f"kmpops_verify_{record_id}_{int(time.time())}",
                sanity_queries=database_config(row.name).sanity_queries,
            )
            checks["restore_test"] = outcome
        else:
            checks["restore_test"] = _check(False, "skipped: integrity check failed")
    ok = all(c["ok"] for c in checks.values())
    rec.add_verification(record_id, ok=ok, checks=checks, run_id=run_id())
    audit(
        "backup.verified" if ok else "backup.verification_failed",
        f"database/{row.name}",
        record_id=record_id,
        checks={k: v["ok"] for k, v in checks.items()},
        seconds=round(time.monotonic() - started, 3),
    )
    return {
        "record_id": record_id,
        "kind": "database",
        "name": row.name,
        "ok": ok,
        "checks": checks,
    }


@task(name="verify-configuration-backup", **_RETRY)
def verify_configuration_backup(record_id: int) -> dict[str, Any]:
    """Verify one configuration backup: manifest object and every blob present and intact.

    Completion: the manifest object exists and every referenced blob exists with the file's size;
    integrity: the manifest's sha256 matches the catalog and every blob re-reads to its sha256
    (which is also the restore test: the files can be reconstructed bit for bit).
    """
    rec = records()
    row = rec.backup(record_id)
    manifest = core.ConfigurationManifest.model_validate(row.manifest)
    store = open_object_store()
    checks: dict[str, Any] = {}
    try:
        body = core.download_bytes(store, row.key, expected_sha256=row.sha256)
        same = core.ConfigurationManifest.from_json_bytes(body) == manifest
        checks["completion"] = _check(
            same,
            "manifest object present and equal to the catalog"
            if same
            else "manifest object differs from the catalog",
        )
    except (NotFound, IntegrityError) as exc:
        checks["completion"] = _check(False, str(exc))
    bad: list[str] = []
    sizes = {e.sha256: e.size for e in manifest.files}
    for digest, size in sizes.items():
        try:
            data = core.download_bytes(store, core.blob_key(digest), expected_sha256=digest)
            if len(data) != size:
                bad.append(f"{digest[:12]}: {len(data)} bytes, expected {size}")
        except (NotFound, IntegrityError) as exc:
            bad.append(f"{digest[:12]}: {exc}")
    checks["integrity"] = _check(
        not bad,
        f"{len(sizes)} blobs re-read" if not bad else "; ".join(bad[:5]),
        bad_blobs=len(bad),
    )
    ok = all(c["ok"] for c in checks.values())
    rec.add_verification(record_id, ok=ok, checks=checks, run_id=run_id())
    audit(
        "backup.verified" if ok else "backup.verification_failed",
        f"configuration/{row.name}",
        record_id=record_id,
        checks={k: v["ok"] for k, v in checks.items()},
    )
    return {
        "record_id": record_id,
        "kind": "configuration",
        "name": row.name,
        "ok": ok,
        "checks": checks,
    }


# -- restore ---------------------------------------------------------------------------------


@contextlib.contextmanager
def downloaded_backup(record_id: int) -> Iterator[tuple[Backup, Path]]:
    """Download a database backup to a private temp file, checked against its sha256.

    Raises IntegrityError (nothing restored) if the stored object does not match the catalog.
    """
    row = records().backup(record_id)
    store = open_object_store()
    with tempfile.TemporaryDirectory(prefix="kmpops-restore-") as tmp:
        local = Path(tmp) / "backup.dump"
        store.download(row.key, local, expected_sha256=row.sha256)
        yield row, local


@task(name="restore-database-backup", **_RETRY)
def restore_database_backup(
    record_id: int, target_dbname: str, *, replace: bool, verify_sha256: bool = True
) -> dict[str, Any]:
    """Restore backup ``record_id`` into ``target_dbname`` of the backup's database server.

    The dump is downloaded and checked first (``verify_sha256=False`` only for an approved forced
    restore of a backup that failed verification). It is restored into a fresh staging database
    which is proven there — row counts equal the manifest's, the configured sanity queries
    pass — before it replaces the target in one transaction (``replace`` must be True if the
    target exists); the old target is kept renamed and returned as ``previous_dbname``. On
    failure (IntegrityError naming the differences, a pg_restore failure or timeout) the staging
    database is dropped and the target is untouched; the failure is audited.
    """
    rec = records()
    row = rec.backup(record_id)
    manifest = core.DatabaseManifest.model_validate(row.manifest)
    store = open_object_store()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kmpops-restore-") as tmp:
        local = Path(tmp) / "backup.dump"
        if verify_sha256:
            store.download(row.key, local, expected_sha256=row.sha256)
        else:  # an approved forced restore of a backup that failed verification
            with open(local, "wb") as fh:
                for chunk in store.iter_chunks(row.key):
                    fh.write(chunk)
        db = open_database(row.name)
        try:
            outcome = core.restore_into(
                db,
                local,
                manifest=manifest,
                target_dbname=target_dbname,
                replace=replace,
                sanity_queries=database_config(row.name).sanity_queries,
                label=f"backup #{record_id}",
            )
        except Exception as exc:
            audit(
                "backup.restore_failed",
                f"database/{row.name}",
                record_id=record_id,
                target=target_dbname,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            raise
    outcome["seconds"] = round(time.monotonic() - started, 3)
    audit("backup.restored", f"database/{row.name}", record_id=record_id, **outcome)
    return outcome


@task(name="restore-host-configuration", **_RETRY)
def restore_host_configuration(record_id: int, *, prune: bool = True) -> dict[str, Any]:
    """Put one host's configuration back as of backup ``record_id`` (blobs checked first)."""
    from kmpops.connectors.ssh import SSHConnection

    row = records().backup(record_id)
    manifest = core.ConfigurationManifest.model_validate(row.manifest)
    cfg = ops_config()
    _, host_cfg = cfg.host(row.name)
    store = open_object_store()
    with SSHConnection.from_host(host_cfg, **cfg.timeouts.ssh_options()) as conn:
        outcome = core.restore_configuration_files(conn, store, manifest, prune=prune)
    summary = {k: len(v) for k, v in outcome.items()}
    audit(
        "configuration.restored",
        f"configuration/{row.name}",
        record_id=record_id,
        backup_id=manifest.backup_id,
        **summary,
    )
    return {"record_id": record_id, "host": row.name, **outcome}


# -- retention -------------------------------------------------------------------------------


@task(name="apply-retention-deletions", **_RETRY)
def apply_retention_deletions(record_ids: list[int], blob_keys: list[str]) -> dict[str, int]:
    """Delete the objects of the given backups (then mark them ``deleted``) and the given blobs.

    Idempotent: an object already gone counts as deleted. The catalog row is marked only after
    its objects are gone, so an interrupted run is simply repeated.
    """
    rec = records()
    store = open_object_store()
    deleted_backups = 0
    for rid in record_ids:
        row = rec.backup(rid)
        keys = [row.key]
        if row.kind == "database":
            keys.append(row.key.removesuffix(".dump") + ".manifest.json")
        for key in keys:
            store.delete(key)
        rec.update_backup(rid, state="deleted", finished_at=row.finished_at or datetime.now(UTC))
        audit("backup.deleted", f"{row.kind}/{row.name}", record_id=rid, keys=keys)
        deleted_backups += 1
    for key in blob_keys:
        store.delete(key)
    if blob_keys:
        audit("backup.blobs_deleted", "configuration/blobs", count=len(blob_keys))
    return {"backups": deleted_backups, "blobs": len(blob_keys)}


# -- copies a restore replaced -----------------------------------------------------------


@task(name="drop-expired-previous-copies", **_RETRY)
def drop_expired_previous_copies(*, dry_run: bool = False) -> list[str]:
    """Drop every configured PostgreSQL database's ``__pre_`` copies (and abandoned
    ``__restoring_`` copies) older than its ``keep_previous_copies``; return their names.

    Their age is read from their names and measured against the real clock (never a
    parameter). ``dry_run`` only lists them. Idempotent (a copy already gone is skipped); each
    drop is audited. Nothing else on the server is touched. A server that cannot be reached is
    logged and skipped (the next run tries again): it never blocks backup retention.
    """
    cfg = ops_config()
    now = datetime.now(UTC)
    dropped: list[str] = []
    for name, dbcfg in sorted(cfg.databases.items()):
        if dbcfg.kind != "postgresql" or dbcfg.dbname is None:
            continue
        db = open_database(name)
        assert isinstance(db, PostgresDatabase)
        try:
            existing = db.list_databases()
        except ConnectorError as exc:
            get_run_logger().warning("old restore copies of %s not checked: %s", name, exc)
            continue
        for copy in expired_previous_copies(
            dbcfg.dbname, existing, now=now, keep=dbcfg.keep_previous_copies
        ):
            if not dry_run:
                db.drop_database(copy)
                audit(
                    "restore.previous_copy_dropped",
                    f"database/{name}",
                    copy=copy,
                    kept_for=str(dbcfg.keep_previous_copies),
                )
            dropped.append(copy)
    return dropped
