"""The sample web service of the local stack: reproducible release tarballs and test traffic.

A release tarball ``web-<version>.tar.gz`` holds, at its top level (no leading directory):
``app.py``, ``control`` (mode 0755), ``VERSION``, ``variant`` and, with ``pad_bytes``, ``pad.bin``.
Extract it into ``<deploy_path>/releases/<version>/`` and point ``<deploy_path>/current`` at it;
``current/control start|stop|restart|status|health --port P`` runs it (see
``infra/local/sample_service/control``).
"""

from __future__ import annotations

import gzip
import http.client
import io
import os
import random
import tarfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kmpops.errors import UnsafeValueError
from kmpops.shellsafe import validate_name

__all__ = [
    "SOURCE_DIR",
    "VARIANTS",
    "build_release",
    "generate_traffic",
    "install_release",
    "release_name",
]

SOURCE_DIR = Path(__file__).resolve().parents[2] / "infra" / "local" / "sample_service"
VARIANTS = ("good", "unhealthy", "errors", "slow")
MAX_TRAFFIC_REQUESTS = 100_000
# Fixed metadata so the same input always gives the same bytes (2020-01-01T00:00:00Z).
_EPOCH = 1_577_836_800
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def release_name(version: str) -> str:
    """``web-<version>.tar.gz``; raises UnsafeValueError for a version that is not a safe name."""
    return f"web-{validate_name(version, what='release version')}.tar.gz"


def _variant_line(variant: str, parameter: float | None) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if parameter is None:
        return f"{variant}\n"
    if variant not in ("errors", "slow"):
        raise ValueError(f"variant {variant!r} takes no parameter")
    if not 0.0 <= parameter <= (1.0 if variant == "errors" else 30.0):
        raise ValueError(f"variant {variant!r}: parameter {parameter!r} out of range")
    return f"{variant} {parameter}\n"


def _pad(version: str, size: int) -> bytes:
    """Deterministic, incompressible filler (so transfers of big releases are honest)."""
    return random.Random(f"web-{version}").randbytes(size)


def build_release(
    version: str,
    dest_dir: Path,
    *,
    variant: str = "good",
    pad_bytes: int = 0,
    parameter: float | None = None,
) -> Path:
    """Build ``dest_dir/web-<version>.tar.gz`` from ``infra/local/sample_service``; return its path.

    Reproducible: sorted members, fixed mtimes, uid/gid 0, no gzip timestamp, so the same
    arguments and sources give the same sha256. ``parameter`` is the error ratio of the "errors"
    variant (default 0.3) or the added latency in seconds of "slow" (default 0.3). Raises
    UnsafeValueError for a bad version, ValueError for a bad variant/parameter/pad size. The
    tarball is written to a temporary name and renamed, so a reader never sees half a file.
    """
    name = release_name(version)
    line = _variant_line(variant, parameter)
    if not 0 <= pad_bytes <= 2**31:
        raise ValueError(f"pad_bytes must be between 0 and 2 GiB, got {pad_bytes}")
    files: dict[str, tuple[bytes, int]] = {
        "VERSION": (f"{version}\n".encode(), 0o644),
        "app.py": ((SOURCE_DIR / "app.py").read_bytes(), 0o644),
        "control": ((SOURCE_DIR / "control").read_bytes(), 0o755),
        "variant": (line.encode(), 0o644),
    }
    if pad_bytes:
        files["pad.bin"] = (_pad(version, pad_bytes), 0o644)

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / name
    tmp = dest_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for member in sorted(files):
                data, mode = files[member]
                info = tarfile.TarInfo(member)
                info.size = len(data)
                info.mode = mode
                info.mtime = _EPOCH
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def install_release(tarball: Path, deploy_path: Path, *, activate: bool = True) -> Path:
    """Extract a release into ``deploy_path/releases/<version>`` (local helper for tests/demo).

    With ``activate`` the ``current`` symlink is switched atomically to it. Returns the release
    directory. Only members named like our own files are accepted (tarfile "data" filter).
    """
    tarball = Path(tarball)
    stem = tarball.name.removesuffix(".tar.gz")
    if not stem.startswith("web-"):
        raise UnsafeValueError(f"not a web release tarball: {tarball.name!r}")
    version = validate_name(stem[4:], what="release version")
    release_dir = Path(deploy_path) / "releases" / version
    release_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("shared/run", "shared/log", "shared/config"):
        (Path(deploy_path) / sub).mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        tar.extractall(release_dir, filter="data")
    if activate:
        link = Path(deploy_path) / "current"
        tmp_link = Path(deploy_path) / f".current.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(Path("releases") / version)
        os.replace(tmp_link, link)
    return release_dir


def _check_loopback(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
        raise UnsafeValueError(f"traffic only goes to http://127.0.0.1 / localhost, not {url!r}")
    return parts


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def generate_traffic(
    url: str, *, requests: int, concurrency: int = 4, timeout: float = 5.0
) -> dict[str, Any]:
    """Send ``requests`` GETs to a loopback ``url`` over ``concurrency`` keep-alive connections.

    Returns ``{"requests", "ok", "errors", "failed", "codes", "seconds", "rps", "p50", "p95"}``:
    ``errors`` counts 5xx answers, ``failed`` connection failures; latencies are in seconds.
    Raises UnsafeValueError for a non-loopback URL, ValueError for counts out of range. Never
    raises for failed requests: they are counted.
    """
    parts = _check_loopback(url)
    if not 1 <= requests <= MAX_TRAFFIC_REQUESTS:
        raise ValueError(f"requests must be between 1 and {MAX_TRAFFIC_REQUESTS}, got {requests}")
    if not 1 <= concurrency <= 64:
        raise ValueError(f"concurrency must be between 1 and 64, got {concurrency}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    counter = iter(range(requests))
    lock = threading.Lock()

    def tickets() -> Iterator[int]:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            yield n

    def worker() -> tuple[Counter[str], list[float]]:
        codes: Counter[str] = Counter()
        latencies: list[float] = []
        conn: http.client.HTTPConnection | None = None
        for _ in tickets():
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                codes[str(response.status)] += 1
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                codes["failed"] += 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            latencies.append(time.perf_counter() - started)
        if conn is not None:
            conn.close()
        return codes, latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="traffic") as pool:
        results = [f.result() for f in [pool.submit(worker) for _ in range(concurrency)]]
    seconds = time.perf_counter() - started
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    for c, lat in results:
        codes.update(c)
        latencies.extend(lat)
    latencies.sort()
    failed = codes.get("failed", 0)
    errors = sum(v for k, v in codes.items() if k.startswith("5"))
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    return {
        "requests": requests,
        "ok": ok,
        "errors": errors,
        "failed": failed,
        "codes": dict(sorted(codes.items())),
        "seconds": round(seconds, 4),
        "rps": round(requests / seconds, 1) if seconds > 0 else float("inf"),
        "p50": _quantile(latencies, 0.5),
        "p95": _quantile(latencies, 0.95),
    }
