"""`kmpops stack up|status|down` on a small stack of its own: everything stops by pid file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kmpops.config import load_config
from kmpops.stack._proc import pid_alive

PORT_BASE = 28000


def _kmpops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmpops.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_stack_up_status_down(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    common = ["--root", str(root)]
    up = _kmpops(
        "stack", "up", *common, "--port-base", str(PORT_BASE), "--hosts", "2",
        "--staging-hosts", "1", "--without", "s3", "--without", "postgres",
        "--without", "prefect", "--without", "prometheus",
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert "3 hosts" in up.stdout
        cfg = load_config(root / "ops.yaml")
        assert [h.name for h in cfg.environment("production").hosts] == ["prd-1", "prd-2"]
        assert cfg.storage is not None and cfg.storage.backend == "local"
        # the audit key: generated outside the records, 0600; checkpoints in a local file
        audit_key = root / "secrets" / "audit_key"
        assert str(cfg.records.audit_key) == f"file:{audit_key.resolve()}"
        assert audit_key.stat().st_mode & 0o777 == 0o600
        assert cfg.records.checkpoints is not None
        assert cfg.records.checkpoints.backend == "local"
        key_before = audit_key.read_text()
        status = _kmpops("stack", "status", *common)
        assert status.returncode == 0
        assert status.stdout.count("up  ") == 3
        pids = [int(p.read_text()) for p in root.rglob("*.pid")]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        again = _kmpops("stack", "up", *common, "--port-base", str(PORT_BASE), "--hosts", "2",
                        "--staging-hosts", "1", "--without", "s3", "--without", "postgres",
                        "--without", "prefect", "--without", "prometheus")  # fmt: skip
        assert again.returncode == 0, again.stderr  # idempotent
        assert audit_key.read_text() == key_before  # events tagged with it stay verifiable
        assert sorted(int(p.read_text()) for p in root.rglob("*.pid")) == sorted(pids)
    finally:
        down = _kmpops("stack", "down", *common)
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids)
    assert list(root.rglob("*.pid")) == []


def test_unknown_component_is_refused(tmp_path: Path) -> None:
    res = _kmpops("stack", "up", "--root", str(tmp_path), "--without", "kafka")
    assert res.returncode == 1
    assert "unknown stack components: kafka" in res.stderr
