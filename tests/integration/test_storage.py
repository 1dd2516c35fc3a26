"""ObjectStore against a real SeaweedFS S3 server and a local directory (same tests for both)."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from kmpops.connectors.storage import LocalStore, ObjectStore, PutResult, S3Store, open_store
from kmpops.errors import IntegrityError, NotFound, StorageUnavailable, UnsafeValueError
from kmpops.stack import seaweed

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(stack):
    """The session stack's SeaweedFS (tests use their own key prefixes)."""
    return seaweed.S3Info(**{**stack.s3, "pid_file": Path(stack.s3["pid_file"])})


def _raw_client(info):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=info.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=info.access_key_id,
        aws_secret_access_key=info.secret_access_key,
    )


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        yield LocalStore(tmp_path / "objects")
        return
    info = request.getfixturevalue("s3")
    with S3Store(
        bucket=info.bucket,
        endpoint_url=info.endpoint_url,
        access_key_id=info.access_key_id,
        secret_access_key=info.secret_access_key,
        part_size=5 * MiB,
    ) as s3_store:
        yield s3_store


def _corrupt(store: ObjectStore, key: str, request) -> None:
    """Rewrite the stored object with one byte flipped, keeping its recorded metadata."""
    if isinstance(store, LocalStore):
        path = store.root / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        return
    client = _raw_client(request.getfixturevalue("s3"))
    head = client.head_object(Bucket=store.bucket, Key=key)
    data = bytearray(client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=store.bucket, Key=key, Body=bytes(data), Metadata=head["Metadata"])


class UnknownLength(io.RawIOBase):
    """A stream of ``total`` pseudo-random bytes with no len(), no seek, odd-sized reads."""

    def __init__(self, total: int, *, fail_after: int | None = None) -> None:
        self.remaining = total
        self.fail_after = fail_after
        self.sent = 0
        self.digest = hashlib.sha256()
        self._block = os.urandom(MiB + 7)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise OSError("producer died")
        n = min(len(buffer), self.remaining, 300_001)
        chunk = self._block[self.sent % MiB : self.sent % MiB + n]
        buffer[: len(chunk)] = chunk
        self.remaining -= len(chunk)
        self.sent += len(chunk)
        self.digest.update(chunk)
        return len(chunk)


def test_round_trip_with_sha256(store, tmp_path):
    data = os.urandom(123_457)
    put = store.put_bytes("backups/app/one.bin", data, metadata={"kind": "test"})
    assert put == PutResult("backups/app/one.bin", len(data), hashlib.sha256(data).hexdigest())
    info = store.head("backups/app/one.bin")
    assert info is not None and info.size == len(data) and info.sha256 == put.sha256
    assert info.metadata["kind"] == "test"
    dest = tmp_path / "out" / "one.bin"
    got = store.download(
        "backups/app/one.bin", dest, expected_sha256=put.sha256, expected_size=put.size
    )
    assert got == put and dest.read_bytes() == data
    assert b"".join(store.iter_chunks("backups/app/one.bin")) == data
    buf = io.BytesIO()
    store.download("backups/app/one.bin", buf)
    assert buf.getvalue() == data


def test_30mb_stream_of_unknown_length(store, tmp_path):
    stream = UnknownLength(30 * MiB + 12345)
    put = store.put_stream("big/stream.bin", io.BufferedReader(stream, buffer_size=64 * 1024))
    assert put.size == 30 * MiB + 12345
    assert put.sha256 == stream.digest.hexdigest()
    assert store.head("big/stream.bin").sha256 == put.sha256
    got = store.download("big/stream.bin", tmp_path / "big.bin", expected_sha256=put.sha256)
    assert got.size == put.size


def test_failed_stream_leaves_no_object(store):
    stream = UnknownLength(30 * MiB, fail_after=12 * MiB)
    with pytest.raises(OSError, match="producer died"):
        store.put_stream("big/failed.bin", stream)
    assert not store.exists("big/failed.bin")
    if isinstance(store, S3Store):
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert [u for u in uploads if u["Key"] == "big/failed.bin"] == []


def test_before_commit_refusal_leaves_no_object(store):
    def refuse(result: PutResult) -> None:
        raise RuntimeError(f"producer exited 1 after {result.size} bytes")

    for size in (1000, 11 * MiB):  # single put and multipart
        with pytest.raises(RuntimeError, match="producer exited"):
            store.put_stream("refused.bin", UnknownLength(size), before_commit=refuse)
        assert not store.exists("refused.bin")


def test_corrupted_object_fails_verification(store, tmp_path, request):
    data = os.urandom(200_000)
    put = store.put_bytes("corrupt/me.bin", data)
    _corrupt(store, "corrupt/me.bin", request)
    restore_dir = tmp_path / "restore"
    restore_dir.mkdir()
    dest = restore_dir / "restored.bin"
    with pytest.raises(IntegrityError) as err:
        store.download("corrupt/me.bin", dest, expected_sha256=put.sha256)
    text = str(err.value)
    assert "corrupt/me.bin" in text and put.sha256 in text and "got" in text
    assert not dest.exists()
    assert list(restore_dir.iterdir()) == []  # no temporary left either
    # without an expected digest, the recorded one is used
    with pytest.raises(IntegrityError, match="recorded"):
        store.download("corrupt/me.bin", io.BytesIO())
    with pytest.raises(IntegrityError, match="size mismatch"):
        store.download("corrupt/me.bin", tmp_path / "x", expected_size=put.size + 1)


@pytest.mark.parametrize(
    "key", ["/abs", "a/../b", "..", "a\x00b", "", "a//b", "./a", ".kmpops/meta/x", "a\\b"]
)
def test_bad_keys_rejected(store, key):
    with pytest.raises(UnsafeValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(UnsafeValueError):
        store.head(key)


def test_list_and_delete(store):
    for name in ("a.bin", "b.bin", "sub/c.bin"):
        store.put_bytes(f"ls/{name}", name.encode())
    store.put_bytes("other/x.bin", b"x")
    assert [o.key for o in store.list("ls/")] == ["ls/a.bin", "ls/b.bin", "ls/sub/c.bin"]
    assert [o.size for o in store.list("ls/")] == [5, 5, 9]
    store.delete("ls/b.bin")
    store.delete("ls/b.bin")  # idempotent
    assert [o.key for o in store.list("ls/")] == ["ls/a.bin", "ls/sub/c.bin"]
    assert not store.exists("ls/b.bin") and store.head("ls/b.bin") is None
    with pytest.raises(NotFound):
        store.download("ls/b.bin", io.BytesIO())


def test_endpoint_down_is_storage_unavailable_quickly():
    secret = "s3cr3t-never-shown"
    store = S3Store(
        bucket="kmp-ops",
        endpoint_url="http://127.0.0.1:24397",
        access_key_id="AKIAEXAMPLE",
        secret_access_key=secret,
        connect_timeout=1,
        max_attempts=1,
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as err:
        store.put_bytes("x.bin", b"data")
    assert time.monotonic() - started < 5
    assert "127.0.0.1:24397" in str(err.value) and secret not in str(err.value)
    assert secret not in repr(store)
    with pytest.raises(StorageUnavailable):
        store.head("x.bin")
    with pytest.raises(StorageUnavailable):
        store.list()


def test_open_store_builds_both_backends(s3, tmp_path):
    from types import SimpleNamespace

    refs = {"file:key": s3.access_key_id, "file:secret": s3.secret_access_key}
    cfg = SimpleNamespace(
        backend="s3",
        bucket=s3.bucket,
        endpoint_url=s3.endpoint_url,
        region="us-east-1",
        access_key_id="file:key",
        secret_access_key="file:secret",
        path=None,
    )
    with open_store(cfg, refs.__getitem__) as store:
        assert isinstance(store, S3Store)
        store.put_bytes("open/ok.bin", b"ok")
        assert store.exists("open/ok.bin")
    local = open_store(SimpleNamespace(backend="local", path=tmp_path / "o"), refs.__getitem__)
    assert isinstance(local, LocalStore)
    with pytest.raises(ValueError, match="unknown storage backend"):
        open_store(SimpleNamespace(backend="ftp"), refs.__getitem__)


def test_wrong_credentials_are_refused_without_leaking(s3):
    from kmpops.errors import AuthenticationFailed

    store = S3Store(
        bucket=s3.bucket,
        endpoint_url=s3.endpoint_url,
        access_key_id=s3.access_key_id,
        secret_access_key="wrong-secret-value",
        max_attempts=1,
    )
    with pytest.raises(AuthenticationFailed) as err:
        store.put_bytes("x.bin", b"x")
    assert "wrong-secret-value" not in str(err.value)


def test_local_store_paths(tmp_path: Path):
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("a/b.bin", b"hello")
    assert (tmp_path / "objects" / "a" / "b.bin").read_bytes() == b"hello"
    assert list((tmp_path / "objects" / ".kmpops" / "tmp").iterdir()) == []
