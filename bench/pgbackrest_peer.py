"""pgBackRest as the bench's peer: a stanza on the bench cluster, full backups into the same
SeaweedFS S3 server (over its HTTPS port — pgBackRest 2.45 speaks S3 only over TLS), restores
into a fresh data directory started on a port of its own.

Bench-only (not part of kmp-ops). Install: ``./infra/install-debs.sh pgbackrest``. Everything
pgBackRest touches runs as the ``postgres`` system user (it owns the cluster); its
configuration, which holds the S3 secret, is a 0600 file of that user, never argv.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

STANZA = "bench"


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate + key for 127.0.0.1 (openssl), readable by the S3 server."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "s3.crt", directory / "s3.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def _run(argv: list[str], *, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    ids = _ids()
    kwargs: dict[str, object] = {}
    if ids is not None:
        kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        **kwargs,  # type: ignore[arg-type]
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:3])}… exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-1500:]}"
        )
    return result


def _chown(path: Path) -> None:
    ids = _ids()
    if ids is not None:
        os.chown(path, *ids)


@dataclass
class PgBackRest:
    """One stanza on the bench cluster (``data_dir``, socket in ``socket_dir``, ``port``)."""

    home: Path
    data_dir: Path
    socket_dir: Path
    port: int
    bin_dir: Path
    s3_port: int
    bucket: str
    access_key_id: str
    secret_access_key: str
    process_max: int = 2

    def __post_init__(self) -> None:
        for name in ("home", "data_dir", "socket_dir", "bin_dir"):
            setattr(self, name, Path(getattr(self, name)))

    @property
    def conf(self) -> Path:
        return self.home / "pgbackrest.conf"

    def write_conf(self, compress_type: str = "gz") -> None:
        """Write the configuration (0600, owned by postgres) for ``compress_type`` (gz|zst|lz4)."""
        for sub in ("log", "lock", "spool"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
            _chown(self.home / sub)
        _chown(self.home)
        text = "\n".join(
            [
                "[global]",
                "repo1-type=s3",
                "repo1-s3-endpoint=127.0.0.1",
                f"repo1-storage-port={self.s3_port}",
                f"repo1-s3-bucket={self.bucket}",
                "repo1-s3-region=us-east-1",
                f"repo1-s3-key={self.access_key_id}",
                f"repo1-s3-key-secret={self.secret_access_key}",
                "repo1-s3-uri-style=path",
                "repo1-storage-verify-tls=n",
                "repo1-path=/pgbackrest",
                "repo1-retention-full=2",
                f"process-max={self.process_max}",
                "start-fast=y",
                f"compress-type={compress_type}",
                f"log-path={self.home / 'log'}",
                f"lock-path={self.home / 'lock'}",
                f"spool-path={self.home / 'spool'}",
                "log-level-console=warn",
                "log-level-file=off",
                "",
                f"[{STANZA}]",
                f"pg1-path={self.data_dir}",
                f"pg1-port={self.port}",
                f"pg1-socket-path={self.socket_dir}",
                "pg1-user=postgres",
                "",
            ]
        )
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _chown(self.conf)

    def archive_command(self) -> str:
        return f"pgbackrest --config={self.conf} --stanza={STANZA} archive-push %p"

    def cmd(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return _run(
            ["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args], timeout=timeout
        )

    def setup(self) -> None:
        """``stanza-create`` and ``check`` (WAL archiving works end to end)."""
        self.cmd("stanza-create")
        self.cmd("check", timeout=300)

    def backup(self) -> float:
        """One full backup; returns its wall seconds."""
        started = time.monotonic()
        self.cmd("--type=full", "backup")
        return time.monotonic() - started

    def repo_size(self) -> int:
        """Bytes of the newest backup in the repository (``info --output=json``)."""
        import json

        info = json.loads(self.cmd("info", "--output=json").stdout)
        backups = info[0]["backup"]
        return int(backups[-1]["info"]["repository"]["delta"])

    def restore(self, target: Path, port: int) -> tuple[float, float]:
        """Restore the newest backup into ``target`` (immediate recovery, then promote; archiving
        off in the copy), start it on ``port`` and wait until it accepts connections.

        Returns (seconds of ``pgbackrest restore``, seconds until the copy was ready). The copy
        is stopped and removed before returning.
        """
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(mode=0o700, parents=True)
        _chown(target)
        _chown(target.parent)  # the copy's server log goes beside it
        run = target.parent / f"{target.name}-run"
        run.mkdir(exist_ok=True)
        _chown(run)
        started = time.monotonic()
        try:
            self.cmd(
                f"--pg1-path={target}",
                "--type=immediate",
                "--target-action=promote",
                "--archive-mode=off",
                "restore",
            )
            restored = time.monotonic() - started
            _run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(target),
                    "-l",
                    str(target.parent / f"{target.name}.log"),
                    "-o",
                    f"-p {port} -c unix_socket_directories={run} -c listen_addresses=127.0.0.1",
                    "-w",
                    "-t",
                    "600",
                    "start",
                ],
                timeout=660,
            )
            _wait_ready(self.bin_dir, run, port)
            ready = time.monotonic() - started
        finally:
            subprocess.run(
                [str(self.bin_dir / "pg_ctl"), "-D", str(target), "-m", "immediate", "stop"],
                capture_output=True,
                check=False,
                timeout=60,
                **({"user": "postgres"} if _ids() else {}),  # type: ignore[arg-type]
            )
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
        return restored, ready


def _wait_ready(bin_dir: Path, socket_dir: Path, port: int, timeout: float = 600) -> None:
    """Until the promoted copy answers a query as a primary (not in recovery)."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            [
                str(bin_dir / "psql"),
                "-h",
                str(socket_dir),
                "-p",
                str(port),
                "-U",
                "postgres",
                "-d",
                "benchdb",
                "-Atc",
                "SELECT pg_is_in_recovery()",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if result.returncode == 0 and result.stdout.strip() == "f":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"restored copy on port {port} not ready: {result.stderr.strip()}")
        time.sleep(0.1)
