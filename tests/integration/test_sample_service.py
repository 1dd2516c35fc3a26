"""The sample service release: reproducible tarball, control start/health/stop, variants."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmpops.errors import UnsafeValueError
from kmpops.stack._proc import port_open
from kmpops.stack.sample_service import build_release, generate_traffic, install_release

PORT = 24510


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def control(release: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(release / "control"), *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def deploy_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "srv" / "web"
    yield path
    current = path / "current"
    if current.exists():
        control(current, "stop")


def test_build_release_is_reproducible(tmp_path: Path) -> None:
    a = build_release("1.2.3", tmp_path / "a", variant="errors", pad_bytes=4096)
    b = build_release("1.2.3", tmp_path / "b", variant="errors", pad_bytes=4096)
    assert a.name == "web-1.2.3.tar.gz"
    assert sha256(a) == sha256(b)
    assert sha256(build_release("1.2.4", tmp_path / "c", variant="errors")) != sha256(a)
    with tarfile.open(a) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["VERSION", "app.py", "control", "pad.bin", "variant"]
        assert members["control"].mode == 0o755
        assert members["pad.bin"].size == 4096
        assert tar.extractfile("VERSION").read() == b"1.2.3\n"


@pytest.mark.parametrize("version", ["", "../x", "1.0 ; rm", "-rf", "a/b"])
def test_build_release_rejects_unsafe_versions(tmp_path: Path, version: str) -> None:
    with pytest.raises(UnsafeValueError):
        build_release(version, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_release_rejects_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: good, unhealthy, errors, slow"):
        build_release("1.0.0", tmp_path, variant="flaky")


def test_control_start_health_stop(tmp_path: Path, deploy_path: Path) -> None:
    install_release(build_release("2.0.0", tmp_path / "dist"), deploy_path)
    current = deploy_path / "current"
    started = control(current, "start", "--port", str(PORT))
    assert started.returncode == 0, started.stderr
    assert "web started" in started.stdout
    assert (deploy_path / "shared" / "run" / "web.pid").exists()
    assert control(current, "start", "--port", str(PORT)).stdout.startswith("web already running")

    health = control(current, "health", "--port", str(PORT))
    assert health.returncode == 0 and '"version": "2.0.0"' in health.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/version", timeout=5) as r:
        assert json.load(r) == {"version": "2.0.0", "variant": "good"}

    traffic = generate_traffic(f"http://127.0.0.1:{PORT}/work", requests=50, concurrency=4)
    assert traffic["ok"] == 50 and traffic["errors"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'web_requests_total{handler="/work",code="200"} 50' in text
    assert 'web_version_info{version="2.0.0",variant="good"} 1' in text

    # restart without --port reuses the port of the last start
    restarted = control(current, "restart")
    assert restarted.returncode == 0, restarted.stderr
    assert control(current, "status").returncode == 0

    stopped = control(current, "stop")
    assert stopped.returncode == 0 and "web stopped" in stopped.stdout
    assert not port_open(PORT)
    assert control(current, "status").returncode == 3
    assert control(current, "health", "--port", str(PORT)).returncode == 1


def test_unhealthy_variant_fails_health(tmp_path: Path, deploy_path: Path) -> None:
    install_release(build_release("3.0.0", tmp_path / "dist", variant="unhealthy"), deploy_path)
    current = deploy_path / "current"
    started = control(current, "start", "--port", str(PORT + 1))
    assert started.returncode == 0, started.stderr
    assert "unhealthy" in started.stdout
    health = control(current, "health", "--port", str(PORT + 1))
    assert health.returncode == 1
    assert "503" in health.stdout


def test_errors_and_slow_variants(tmp_path: Path, deploy_path: Path) -> None:
    install_release(
        build_release("4.0.0", tmp_path / "dist", variant="errors", parameter=0.5), deploy_path
    )
    current = deploy_path / "current"
    assert control(current, "start", "--port", str(PORT + 2)).returncode == 0
    traffic = generate_traffic(f"http://127.0.0.1:{PORT + 2}/", requests=40, concurrency=2)
    assert traffic["errors"] == 20 and traffic["ok"] == 20
    assert control(current, "health").returncode == 0  # healthy although it errors
    control(current, "stop")

    install_release(build_release("5.0.0", tmp_path / "dist", variant="slow"), deploy_path)
    assert control(current, "start", "--port", str(PORT + 2)).returncode == 0
    traffic = generate_traffic(f"http://127.0.0.1:{PORT + 2}/work", requests=4, concurrency=2)
    assert traffic["ok"] == 4 and traffic["p50"] >= 0.3


def test_start_fails_clearly_when_port_taken(tmp_path: Path, deploy_path: Path) -> None:
    other = tmp_path / "other"
    install_release(build_release("6.0.0", tmp_path / "dist"), other)
    try:
        assert control(other / "current", "start", "--port", str(PORT + 3)).returncode == 0
        install_release(build_release("6.0.1", tmp_path / "dist"), deploy_path)
        failed = control(deploy_path / "current", "start", "--port", str(PORT + 3))
        assert failed.returncode == 1
        assert "exited during start" in failed.stderr
        assert "cannot listen" in failed.stderr
    finally:
        control(other / "current", "stop")


def test_traffic_is_loopback_only() -> None:
    with pytest.raises(UnsafeValueError):
        generate_traffic("http://example.org/", requests=1)
    with pytest.raises(ValueError):
        generate_traffic("http://127.0.0.1:1/", requests=0)
