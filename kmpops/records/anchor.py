"""Write-once storage for audit checkpoints, outside the records database.

Two stores behind one narrow interface (``write`` one checkpoint, ``read`` them all):

* :class:`S3CheckpointStore` — one object per checkpoint in a bucket created with Object Lock,
  put once (``If-None-Match: *``) in COMPLIANCE mode until its time + the configured retention.
  Reading lists every *version* under the prefix, so a delete marker or a later put to the same
  key (which S3 keeps as a new version) cannot hide a checkpoint.
* :class:`LocalCheckpointStore` — the embedded default: one JSON line per checkpoint appended to
  a file opened ``O_APPEND`` (created mode 0600). kmp-ops only ever appends; whoever can write
  that file could still truncate it (put it where the records' writers cannot, or ``chattr +a``).

:func:`open_checkpoint_store` builds the configured one from the validated ``OpsConfig``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from kmpops.config import AuditCheckpoints, OpsConfig
from kmpops.connectors.storage import S3Store
from kmpops.errors import ConfigError, ConnectorError
from kmpops.records.audit import Checkpoint

_NAMED_SEQ = re.compile(r"^(\d{12})-")

__all__ = [
    "CheckpointStore",
    "LocalCheckpointStore",
    "S3CheckpointStore",
    "open_checkpoint_store",
]


class CheckpointStore(Protocol):
    """Where checkpoints are anchored."""

    where: str

    def write(self, checkpoint: Checkpoint) -> str:
        """Store one checkpoint for good; return where it is (a key@version or file:line)."""
        ...

    def read(self, *, limit: int | None = None) -> tuple[list[Checkpoint], list[str]]:
        """The stored checkpoints (at most the ``limit`` newest, where the store can tell which
        are newest without reading them), and one message per entry that could not be parsed."""
        ...


class LocalCheckpointStore:
    """An append-only JSON Lines file of checkpoints (the embedded default)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = f"file:{self.path}"

    def write(self, checkpoint: Checkpoint) -> str:
        """Append one line (``O_APPEND``, fsynced); creates the file mode 0600 if missing.

        Raises ConnectorError naming the file if it cannot be written. Never rewrites a line.
        """
        line = (checkpoint.to_json() + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            with self.path.open("rb") as fh:
                count = sum(1 for _ in fh)
        except OSError as err:
            raise ConnectorError(
                f"audit checkpoint: cannot append to {self.path}: {err.strerror}"
            ) from None
        return f"{self.path}:{count}"

    def read(self, *, limit: int | None = None) -> tuple[list[Checkpoint], list[str]]:
        """Every line of the file (a missing file holds none; ``limit`` is not needed: reading
        a local file is cheap)."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return [], []
        except OSError as err:
            raise ConnectorError(
                f"audit checkpoints: cannot read {self.path}: {err.strerror}"
            ) from None
        found, bad = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                found.append(Checkpoint.from_json(line, where=f"{self.path}:{number}"))
            except ValueError as err:
                bad.append(str(err))
        return found, bad


class S3CheckpointStore:
    """Checkpoints as COMPLIANCE-locked objects in an Object Lock bucket."""

    def __init__(self, store: S3Store, *, prefix: str, retention_s: float) -> None:
        self.store = store
        self.prefix = prefix
        self.retention_s = retention_s
        self.where = f"s3://{store.bucket}/{prefix}"

    def write(self, checkpoint: Checkpoint) -> str:
        """Put the checkpoint once, locked until its time + retention; return ``key@version``.

        Raises ConnectorError if the bucket has no Object Lock (then the checkpoint would not be
        write-once, so nothing is written) or the store refuses the put.
        """
        if not self.store.object_lock_enabled():
            raise ConnectorError(
                f"audit checkpoint: bucket {self.store.bucket!r} has no Object Lock "
                "(create it with object lock enabled); nothing written"
            )
        stamp = checkpoint.ts.strftime("%Y%m%dT%H%M%S%fZ")
        key = f"{self.prefix}{checkpoint.seq:012d}-{stamp}-{checkpoint.sig[:12]}.json"
        locked = self.store.put_locked(
            key,
            checkpoint.to_json().encode(),
            retain_until=checkpoint.ts + timedelta(seconds=self.retention_s),
        )
        return f"{key}@{locked.version_id}"

    def read(self, *, limit: int | None = None) -> tuple[list[Checkpoint], list[str]]:
        """Every version of every object directly under the prefix (not in sub-folders, which
        may hold other chains' checkpoints), newest ``seq`` first by the seq in its name, at most
        ``limit`` of them.

        Each checkpoint carries the seq its name claims (``named_seq``): a valid checkpoint
        copied under a newer name (to hide the newer ones) is reported by ``verify_chain``, and
        forged ones under newer names fail their signature, so the limit cannot hide a
        truncation without a reported problem.
        """
        entries = []
        for key, version in self.store.list_versions(self.prefix):
            name = key[len(self.prefix) :]
            if "/" in name:
                continue
            match = _NAMED_SEQ.match(name)
            entries.append((int(match.group(1)) if match else -1, key, version))
        entries.sort(reverse=True)
        found, bad = [], []
        for named_seq, key, version in entries[:limit] if limit else entries:
            where = f"s3://{self.store.bucket}/{key}@{version}"
            try:
                checkpoint = Checkpoint.from_json(self.store.get_version(key, version), where=where)
            except ValueError as err:
                bad.append(str(err))
                continue
            found.append(replace(checkpoint, named_seq=named_seq))
        return found, bad


def open_checkpoint_store(
    cfg: OpsConfig, resolve_secret: Callable[[Any], str]
) -> CheckpointStore | None:
    """The checkpoint store ``records.checkpoints`` names (or the SQLite default), else None.

    ``resolve_secret`` resolves the storage credentials (S3 only). Raises ConfigError if the
    S3 backend is chosen without S3 storage.
    """
    target: AuditCheckpoints | None = cfg.records.checkpoint_target()
    if target is None:
        return None
    if target.backend == "local":
        assert target.path is not None
        return LocalCheckpointStore(target.path)
    storage = cfg.storage
    if storage is None or storage.backend != "s3" or target.bucket is None:
        raise ConfigError(["records.checkpoints: backend s3 needs s3 storage and a bucket"])
    if storage.access_key_id is None or storage.secret_access_key is None:
        raise ConfigError(["storage: access_key_id and secret_access_key are needed for s3"])
    s3 = S3Store(
        bucket=target.bucket,
        endpoint_url=storage.endpoint_url,
        region=storage.region,
        access_key_id=resolve_secret(storage.access_key_id),
        secret_access_key=resolve_secret(storage.secret_access_key),
        connect_timeout=5.0,
        read_timeout=30.0,
    )
    return S3CheckpointStore(s3, prefix=target.prefix, retention_s=target.retention.total_seconds())
