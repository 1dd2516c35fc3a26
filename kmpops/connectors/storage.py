"""Object storage: one narrow interface over an S3 bucket (boto3) or a local directory.

Every object written through :class:`ObjectStore` records its SHA-256 (S3 object metadata
``sha256``; a JSON sidecar for :class:`LocalStore`), and every download is verified against the
caller's expected digest/size or, failing that, the recorded one. Writes are all-or-nothing: an
upload that fails or is interrupted leaves no object (S3 multipart uploads are aborted; local
writes go to a temporary file that is renamed into place only when complete).

Errors: :class:`~kmpops.errors.UnsafeValueError` for a bad key, :class:`~kmpops.errors.NotFound`
for a missing object, :class:`~kmpops.errors.StorageUnavailable` (transient) when the endpoint is
down or answers 5xx, :class:`~kmpops.errors.IntegrityError` on a checksum/size mismatch,
:class:`~kmpops.errors.ConnectorError` for anything else the store refuses. Messages name the
endpoint/bucket/key, never a credential.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from pydantic import SecretStr

from kmpops.connectors._closing import Closing
from kmpops.errors import (
    AuthenticationFailed,
    ConnectorError,
    IntegrityError,
    NotFound,
    StorageUnavailable,
    UnsafeValueError,
)

__all__ = [
    "LocalStore",
    "LockedObject",
    "ObjectInfo",
    "ObjectStore",
    "PutResult",
    "S3Store",
    "open_store",
    "validate_key",
]

MiB = 1024 * 1024
_COPY_CHUNK = 1 * MiB
_MAX_KEY = 1024
_SHA_META = "sha256"
_S3_MIN_PART = 5 * MiB
_S3_MAX_PARTS = 10_000
_S3_MAX_COPY = 5 * 1024 * MiB

BeforeCommit = Callable[["PutResult"], None]


@dataclass(frozen=True)
class PutResult:
    """What was stored (or downloaded): the key, its size in bytes and its SHA-256 (hex)."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class LockedObject:
    """A write-once object: its key, version, lock mode and the time until which it is locked."""

    key: str
    version_id: str
    mode: str
    retain_until: datetime
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, size, user metadata (``sha256`` included) and last-modified time.

    ``list()`` fills ``metadata`` only where the backend returns it cheaply (LocalStore); use
    ``head()`` for an S3 object's metadata.
    """

    key: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    last_modified: datetime | None = None

    @property
    def sha256(self) -> str | None:
        """The SHA-256 recorded when the object was written, if any."""
        return self.metadata.get(_SHA_META)


@runtime_checkable
class ObjectStore(Protocol):
    """Put, get, verify, list and delete objects by key."""

    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> PutResult: ...

    def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> PutResult: ...

    def download(
        self,
        key: str,
        dest: BinaryIO | Path,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> PutResult: ...

    def iter_chunks(self, key: str) -> Iterator[bytes]: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise UnsafeValueError.

    Refused: non-strings, empty, longer than 1024, a leading ``/``, a ``..`` or empty segment,
    NUL/newline/backslash characters, and the reserved first segment ``.kmpops``.
    """
    if not isinstance(key, str) or not key:
        raise UnsafeValueError(f"object key {key!r} is empty or not a string")
    if len(key) > _MAX_KEY:
        raise UnsafeValueError(f"object key is longer than {_MAX_KEY} characters")
    if any(ch in key for ch in ("\x00", "\n", "\r", "\\")):
        raise UnsafeValueError(f"object key {key!r} contains NUL, newline or backslash")
    if key.startswith("/"):
        raise UnsafeValueError(f"object key {key!r} starts with '/'")
    segments = key.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise UnsafeValueError(f"object key {key!r} has an empty, '.' or '..' segment")
    if segments[0] == ".kmpops":
        raise UnsafeValueError(f"object key {key!r} uses the reserved prefix '.kmpops/'")
    return key


def _validate_prefix(prefix: str) -> str:
    if prefix:
        # a prefix may end with "/" (a "directory"); the part before must be a valid key
        validate_key(prefix.rstrip("/") or "x")
        if prefix.startswith("/"):
            raise UnsafeValueError(f"prefix {prefix!r} starts with '/'")
    return prefix


def _validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for name, value in meta.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise UnsafeValueError(f"metadata name {name!r} must be letters, digits, '-' or '_'")
        if not isinstance(value, str) or not value.isascii() or "\n" in value:
            raise UnsafeValueError(f"metadata {name!r} must be a single line of ASCII text")
    meta.pop(_SHA_META, None)  # recorded by the store itself
    return {k.lower(): v for k, v in meta.items()}


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Read up to ``size`` bytes, blocking until that many arrive or the stream ends."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _verify(
    key: str,
    actual: PutResult,
    *,
    expected_sha256: str | None,
    expected_size: int | None,
    recorded_sha256: str | None,
) -> None:
    if expected_size is not None and actual.size != expected_size:
        raise IntegrityError(
            f"object {key!r}: size mismatch, expected {expected_size} bytes, got {actual.size}"
        )
    want = expected_sha256 or recorded_sha256
    source = "expected" if expected_sha256 else "recorded"
    if want is not None and actual.sha256 != want.lower():
        raise IntegrityError(
            f"object {key!r}: sha256 mismatch, {source} {want.lower()}, got {actual.sha256}"
        )


def _write_verified(
    key: str,
    chunks: Iterator[bytes],
    dest: BinaryIO | Path,
    *,
    expected_sha256: str | None,
    expected_size: int | None,
    recorded_sha256: str | None,
) -> PutResult:
    """Write ``chunks`` to ``dest`` hashing on the way; verify; a Path gets it atomically.

    On a mismatch a Path destination is left untouched (the temporary file is removed); a
    file object has already received the bytes — the caller discards them.
    """

    def copy_verified(out: BinaryIO) -> PutResult:
        digest = hashlib.sha256()
        size = 0
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        result = PutResult(key=key, size=size, sha256=digest.hexdigest())
        _verify(
            key,
            result,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            recorded_sha256=recorded_sha256,
        )
        return result

    if not isinstance(dest, str | os.PathLike):
        return copy_verified(dest)
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            result = copy_verified(out)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return result


class _StoreBase(Closing, ABC):
    """What S3Store and LocalStore share: put_bytes, download (verified) and context management.

    Subclasses provide ``put_stream`` and ``_verified_source``.
    """

    put_stream: Callable[..., PutResult]  # see ObjectStore.put_stream

    @abstractmethod
    def _verified_source(
        self, key: str, *, need_recorded: bool
    ) -> tuple[Iterator[bytes], str | None]:
        """The object's chunks and its recorded sha256 (looked up only if ``need_recorded``).

        Raises NotFound if the object does not exist.
        """

    def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> PutResult:
        """Store ``data`` under ``key`` (see :meth:`put_stream`)."""
        return self.put_stream(key, io.BytesIO(data), metadata=metadata)

    def download(
        self,
        key: str,
        dest: BinaryIO | Path,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> PutResult:
        """Copy the object to ``dest`` and verify it against ``expected_*`` or its recorded sha256.

        Raises IntegrityError naming the key, the expected and the actual values; a Path
        destination is then left absent (written via a temporary file + rename). NotFound if the
        object does not exist.
        """
        validate_key(key)
        chunks, recorded = self._verified_source(key, need_recorded=expected_sha256 is None)
        return _write_verified(
            key,
            chunks,
            dest,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            recorded_sha256=recorded,
        )


# --------------------------------------------------------------------------------------------
# S3


class S3Store(_StoreBase):
    """An S3 bucket (AWS, SeaweedFS, MinIO, ...) via boto3; lazy client, context manager.

    Uploads of any length stream through a multipart upload of ``part_size`` parts with at most
    ``max_concurrency`` parts in flight, so memory stays near ``(max_concurrency + 1) *
    part_size`` whatever the object size. The SHA-256 is computed on the way and stored as the
    object's ``sha256`` metadata. Any failure before completion aborts the multipart upload.
    """

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str,
        secret_access_key: str | SecretStr,
        part_size: int = 8 * MiB,
        max_concurrency: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if part_size < _S3_MIN_PART:
            raise ValueError(f"part_size must be at least {_S3_MIN_PART} bytes (S3 minimum)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self._access_key_id = access_key_id
        self._secret = (
            secret_access_key
            if isinstance(secret_access_key, SecretStr)
            else SecretStr(secret_access_key)
        )
        self._timeouts = (connect_timeout, read_timeout, max_attempts)
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, endpoint_url={self._where()!r})"

    def _where(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (thread-safe)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                connect_timeout, read_timeout, max_attempts = self._timeouts
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret.get_secret_value(),
                    config=Config(
                        connect_timeout=connect_timeout,
                        read_timeout=read_timeout,
                        retries={"max_attempts": max_attempts, "mode": "standard"},
                        max_pool_connections=max(10, self.max_concurrency + 2),
                        s3={"addressing_style": "path"},
                        # we verify SHA-256 end to end ourselves; skip per-request CRCs
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                    ),
                )
            return self._client

    def close(self) -> None:
        """Close the client's connections (a later call reconnects)."""
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None

    # -- error mapping ------------------------------------------------------------------------

    def _error(self, exc: Exception, what: str, key: str | None = None) -> Exception:
        """Translate a botocore exception into the kmp-ops hierarchy (no credentials in text)."""
        from botocore import exceptions as bx

        target = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"
        where = f"{target} at {self._where()}"
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "NotFound", "404") or (
                status == 404 and code != "NoSuchBucket"
            ):
                return NotFound(f"{what}: {target} does not exist")
            if code == "NoSuchBucket":
                return NotFound(f"{what}: bucket {self.bucket!r} does not exist at {self._where()}")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or (
                status == 403
            ):
                return AuthenticationFailed(f"{what}: {where} refused our credentials ({code})")
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                return StorageUnavailable(f"{what}: {where} answered {status} {code}")
            return ConnectorError(f"{what}: {where} refused: {code or status}")
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
            return StorageUnavailable(
                f"{what}: object store at {self._where()} is unavailable ({type(exc).__name__})"
            )
        if isinstance(exc, bx.BotoCoreError):
            return ConnectorError(f"{what}: {where}: {type(exc).__name__}")
        if isinstance(exc, OSError):
            return StorageUnavailable(f"{what}: {where}: {type(exc).__name__}: {exc.strerror}")
        return exc

    @contextlib.contextmanager
    def _mapped(self, what: str, key: str | None) -> Iterator[None]:
        """Re-raise an exception from the block as :meth:`_error` maps it (others unchanged)."""
        try:
            yield
        except Exception as exc:
            mapped = self._error(exc, what, key)
            if mapped is exc:
                raise
            raise mapped from None

    def _call(self, what: str, key: str | None, fn: Callable[..., Any], **kwargs: Any) -> Any:
        with self._mapped(what, key):
            return fn(Bucket=self.bucket, **kwargs)

    # -- writes ---------------------------------------------------------------------------------

    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> PutResult:
        """Store everything ``stream`` yields under ``key``; return its size and SHA-256.

        The stream's length need not be known. ``before_commit(result)`` runs after the stream
        ended and before the object becomes visible; if it raises, nothing is stored (use it to
        check a producer's exit status). Any failure aborts the multipart upload. Raises
        UnsafeValueError, StorageUnavailable, AuthenticationFailed, ConnectorError.
        """
        validate_key(key)
        meta = _validate_metadata(metadata)
        digest = hashlib.sha256()
        first = _read_full(stream, self.part_size)
        digest.update(first)
        if len(first) < self.part_size:
            result = PutResult(key=key, size=len(first), sha256=digest.hexdigest())
            if before_commit is not None:
                before_commit(result)
            self._call(
                "put",
                key,
                self.client.put_object,
                Key=key,
                Body=first,
                Metadata={**meta, _SHA_META: result.sha256},
            )
            return result
        return self._put_multipart(key, stream, first, digest, meta, before_commit)

    def _put_multipart(
        self,
        key: str,
        stream: BinaryIO,
        first: bytes,
        digest: Any,
        meta: dict[str, str],
        before_commit: BeforeCommit | None,
    ) -> PutResult:
        client = self.client
        upload_id = self._call("put", key, client.create_multipart_upload, Key=key, Metadata=meta)[
            "UploadId"
        ]
        slots = threading.BoundedSemaphore(self.max_concurrency)
        futures: list[Future[dict[str, Any]]] = []
        errors: queue.SimpleQueue[BaseException] = queue.SimpleQueue()

        def send(number: int, body: bytes) -> dict[str, Any]:
            try:
                answer = self._call(
                    "put",
                    key,
                    client.upload_part,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                return {"PartNumber": number, "ETag": answer["ETag"]}
            except BaseException as exc:
                errors.put(exc)
                raise
            finally:
                slots.release()

        size = 0
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="s3-part")
        try:
            chunk: bytes = first
            number = 1
            while chunk:
                if number > _S3_MAX_PARTS:
                    raise ConnectorError(
                        f"put: s3://{self.bucket}/{key} needs more than {_S3_MAX_PARTS} parts; "
                        "raise part_size"
                    )
                size += len(chunk)
                slots.acquire()
                if not errors.empty():
                    slots.release()
                    raise errors.get()
                futures.append(pool.submit(send, number, chunk))
                del chunk
                number += 1
                chunk = _read_full(stream, self.part_size)
                digest.update(chunk)
            parts = [f.result() for f in futures]
            result = PutResult(key=key, size=size, sha256=digest.hexdigest())
            if before_commit is not None:
                before_commit(result)
            self._call(
                "put",
                key,
                client.complete_multipart_upload,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=True)
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        pool.shutdown(wait=True)
        try:
            self._record_sha256(key, result, meta)
        except BaseException:
            # an object without its checksum is not one we hand out
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=self.bucket, Key=key)
            raise
        return result

    def _record_sha256(self, key: str, result: PutResult, meta: dict[str, str]) -> None:
        """Add ``sha256`` to a completed multipart object's metadata.

        The digest is known only once the stream ended, after the upload was created: rewrite the
        metadata in place (a server-side copy; metadata-only on SeaweedFS). Objects above the 5 GiB
        single-copy limit get an object tag ``sha256`` instead, which :meth:`head` also reads.
        """
        if result.size <= _S3_MAX_COPY:
            self._call(
                "put",
                key,
                self.client.copy_object,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                Metadata={**meta, _SHA_META: result.sha256},
                MetadataDirective="REPLACE",
            )
        else:
            self._call(
                "put",
                key,
                self.client.put_object_tagging,
                Key=key,
                Tagging={"TagSet": [{"Key": _SHA_META, "Value": result.sha256}]},
            )

    # -- reads ----------------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, metadata and time, or None if it does not exist."""
        validate_key(key)
        try:
            answer = self._call("head", key, self.client.head_object, Key=key)
        except NotFound:
            return None
        metadata = {k.lower(): v for k, v in answer.get("Metadata", {}).items()}
        if _SHA_META not in metadata and answer.get("ContentLength", 0) > _S3_MAX_COPY:
            with contextlib.suppress(ConnectorError):
                tags = self._call("head", key, self.client.get_object_tagging, Key=key)
                for tag in tags.get("TagSet", []):
                    if tag.get("Key") == _SHA_META:
                        metadata[_SHA_META] = tag["Value"]
        return ObjectInfo(
            key=key,
            size=int(answer.get("ContentLength", 0)),
            metadata=metadata,
            last_modified=answer.get("LastModified"),
        )

    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""
        return self.head(key) is not None

    def _open(self, key: str) -> tuple[Any, dict[str, str]]:
        answer = self._call("get", key, self.client.get_object, Key=key)
        meta = {k.lower(): v for k, v in answer.get("Metadata", {}).items()}
        return answer["Body"], meta

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        try:
            with self._mapped("get", key):
                yield from body.iter_chunks(_COPY_CHUNK)
        finally:
            body.close()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """Yield the object's bytes in chunks of about 1 MiB (not verified; see download)."""
        validate_key(key)
        body, _ = self._open(key)
        yield from self._chunks(key, body)

    def _verified_source(
        self, key: str, *, need_recorded: bool
    ) -> tuple[Iterator[bytes], str | None]:
        body, meta = self._open(key)
        recorded = meta.get(_SHA_META)
        if recorded is None and need_recorded:
            info = self.head(key)
            recorded = info.sha256 if info else None
        return self._chunks(key, body), recorded

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key (metadata not filled)."""
        _validate_prefix(prefix)
        found: list[ObjectInfo] = []
        with self._mapped("list", prefix or None):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            key=item["Key"],
                            size=int(item["Size"]),
                            last_modified=item.get("LastModified"),
                        )
                    )
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing object is not an error (idempotent)."""
        validate_key(key)
        self._call("delete", key, self.client.delete_object, Key=key)

    # -- write-once objects (S3 Object Lock) ------------------------------------------------------

    def object_lock_enabled(self) -> bool:
        """True if the bucket was created with Object Lock enabled (it cannot be added later)."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"):
                return False
            raise self._error(exc, "object lock", None) from None
        except Exception as exc:
            mapped = self._error(exc, "object lock", None)
            if mapped is exc:
                raise
            raise mapped from None
        status = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        return status == "Enabled"

    def put_locked(
        self, key: str, data: bytes, *, retain_until: datetime, mode: str = "COMPLIANCE"
    ) -> LockedObject:
        """Write ``data`` once at ``key``, locked in ``mode`` until ``retain_until``.

        The put is conditional (``If-None-Match: *``): an existing ``key`` is never replaced, the
        store answers PreconditionFailed (ConnectorError). In COMPLIANCE mode nobody, the
        account's root included, can delete that version or shorten its lock before
        ``retain_until``. Raises ConnectorError if the bucket has no Object Lock (the store
        refuses the lock headers), StorageUnavailable (transient) if the endpoint is down.
        """
        validate_key(key)
        digest = hashlib.sha256(data).hexdigest()
        answer = self._call(
            "put (object lock)",
            key,
            self.client.put_object,
            Key=key,
            Body=data,
            ContentType="application/json",
            Metadata={_SHA_META: digest},
            ObjectLockMode=mode,
            ObjectLockRetainUntilDate=retain_until,
            IfNoneMatch="*",
        )
        return LockedObject(
            key=key,
            version_id=str(answer.get("VersionId") or ""),
            mode=mode,
            retain_until=retain_until,
            sha256=digest,
        )

    def retention(self, key: str, version_id: str | None = None) -> tuple[str, datetime] | None:
        """``(mode, retain_until)`` of an object version's lock, None if it has none."""
        validate_key(key)
        extra = {"VersionId": version_id} if version_id else {}
        try:
            answer = self._call(
                "retention", key, self.client.get_object_retention, Key=key, **extra
            )
        except ConnectorError as err:
            if "NoSuchObjectLockConfiguration" in str(err):
                return None
            raise
        ret = answer.get("Retention") or {}
        if "Mode" not in ret:
            return None
        return str(ret["Mode"]), ret["RetainUntilDate"].astimezone(UTC)

    def list_versions(self, prefix: str = "") -> list[tuple[str, str]]:
        """``(key, version_id)`` of every stored version under ``prefix`` (delete markers
        excluded: a delete marker hides a key from ``list`` but not its locked versions)."""
        _validate_prefix(prefix)
        found: list[tuple[str, str]] = []
        with self._mapped("list versions", prefix or None):
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Versions", []):
                    found.append((item["Key"], str(item.get("VersionId") or "")))
        return sorted(found)

    def get_version(self, key: str, version_id: str, *, max_bytes: int = 1 * MiB) -> bytes:
        """The bytes of one version of ``key`` (at most ``max_bytes``; larger is refused)."""
        validate_key(key)
        extra = {"VersionId": version_id} if version_id else {}
        answer = self._call("get", key, self.client.get_object, Key=key, **extra)
        body = answer["Body"]
        try:
            with self._mapped("get", key):
                data = body.read(max_bytes + 1)
        finally:
            body.close()
        if len(data) > max_bytes:
            raise ConnectorError(f"get: s3://{self.bucket}/{key} is larger than {max_bytes} bytes")
        return data


# --------------------------------------------------------------------------------------------
# Local directory


class LocalStore(_StoreBase):
    """Objects as files under ``root``: ``root/<key>``, metadata in ``root/.kmpops/meta``.

    Writes go to ``root/.kmpops/tmp`` and are renamed into place once complete and fsynced, so a
    failure never leaves a complete-looking object.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._meta = self.root / ".kmpops" / "meta"
        self._tmp = self.root / ".kmpops" / "tmp"

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _meta_path(self, key: str) -> Path:
        return self._meta / f"{key}.json"

    @staticmethod
    def _io(fn: Callable[..., Any], *args: Any, what: Path, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise ConnectorError(f"put: cannot write {what}: {exc.strerror or exc}") from None

    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> PutResult:
        """Store everything ``stream`` yields under ``key``; return its size and SHA-256.

        ``before_commit(result)`` runs before the file is renamed into place; if it (or anything
        else) fails, the temporary file is removed and any previous object stays as it was.
        """
        path = self._path(key)
        meta = _validate_metadata(metadata)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix="put-", dir=self._tmp)
        except OSError as exc:
            raise ConnectorError(f"put: cannot write under {self.root}: {exc.strerror}") from None
        meta_tmp: str | None = None
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                # producer errors (stream.read) propagate unchanged; our own I/O errors are mapped
                while chunk := stream.read(_COPY_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    self._io(out.write, chunk, what=path)
                self._io(out.flush, what=path)
                self._io(os.fsync, out.fileno(), what=path)
            result = PutResult(key=key, size=size, sha256=digest.hexdigest())
            if before_commit is not None:
                before_commit(result)
            meta_fd, meta_tmp = self._io(tempfile.mkstemp, prefix="meta-", dir=self._tmp, what=path)
            with os.fdopen(meta_fd, "w") as meta_out:
                json.dump({**meta, _SHA_META: result.sha256, "size": str(size)}, meta_out)
            self._io(path.parent.mkdir, parents=True, exist_ok=True, what=path)
            self._io(self._meta_path(key).parent.mkdir, parents=True, exist_ok=True, what=path)
            self._io(os.replace, meta_tmp, self._meta_path(key), what=path)
            meta_tmp = None
            self._io(os.replace, tmp_name, path, what=path)
        except BaseException:
            for name in (tmp_name, meta_tmp):
                if name:
                    with contextlib.suppress(OSError):
                        os.unlink(name)
            raise
        return result

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, metadata and time, or None if it does not exist."""
        path = self._path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        metadata: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            metadata = {
                k: str(v)
                for k, v in json.loads(self._meta_path(key).read_text()).items()
                if k != "size"
            }
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            metadata=metadata,
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        )

    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""
        return self._path(key).is_file()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """Yield the object's bytes in chunks of 1 MiB (not verified; see download)."""
        path = self._path(key)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"get: {key!r} does not exist in {self.root}") from None
        with fh:
            while chunk := fh.read(_COPY_CHUNK):
                yield chunk

    def _verified_source(
        self, key: str, *, need_recorded: bool
    ) -> tuple[Iterator[bytes], str | None]:
        info = self.head(key)
        if info is None:
            raise NotFound(f"get: {key!r} does not exist in {self.root}")
        return self.iter_chunks(key), info.sha256

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key, with metadata."""
        _validate_prefix(prefix)
        found: list[ObjectInfo] = []
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != ".kmpops"]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    info = self.head(key)
                    if info is not None:
                        found.append(info)
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Delete ``key`` and its metadata; deleting a missing object is not an error."""
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._meta_path(key).unlink()


# --------------------------------------------------------------------------------------------


def open_store(storage_config: Any, resolve_secret: Callable[[Any], str]) -> ObjectStore:
    """Build the store ``storage_config`` (a ``kmpops.config.StorageConfig``) describes.

    ``resolve_secret`` turns a configured secret reference (as stored on the config, e.g. a
    ``SecretRef``) into its value; it is called only for the S3 backend. Raises ValueError for
    an unknown backend or a missing bucket/path/credential.
    """
    backend = getattr(storage_config, "backend", None)
    if backend == "local":
        path = getattr(storage_config, "path", None)
        if path is None:
            raise ValueError("storage backend 'local' needs a path")
        return LocalStore(Path(path))
    if backend == "s3":
        bucket = getattr(storage_config, "bucket", None)
        key_ref = getattr(storage_config, "access_key_id", None)
        secret_ref = getattr(storage_config, "secret_access_key", None)
        if not bucket or key_ref is None or secret_ref is None:
            raise ValueError("storage backend 's3' needs bucket, access_key_id, secret_access_key")
        return S3Store(
            bucket=bucket,
            endpoint_url=getattr(storage_config, "endpoint_url", None),
            region=getattr(storage_config, "region", None) or "us-east-1",
            access_key_id=resolve_secret(key_ref),
            secret_access_key=SecretStr(resolve_secret(secret_ref)),
        )
    raise ValueError(f"unknown storage backend {backend!r} (expected 's3' or 'local')")
