"""The records store on SQLite and on PostgreSQL: releases, approvals, backups, incidents, and the
HMAC-authenticated audit chain (edit or delete any row → `kmpops audit verify` names the entry).
Truncation, keyless rewrites and the S3 checkpoints are in tests/security/test_audit_anchor.py."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from kmpops.config import parse_config
from kmpops.records import AuditKeyMissing, Records


def _records_section(tmp_path: Path, url: str) -> dict[str, object]:
    """A config of the records store ``url`` with an audit key and a local checkpoint file."""
    key = tmp_path / "audit_key"
    if not key.exists():
        key.write_text(secrets.token_hex(32))
    return {
        "records": {
            "url": url,
            "audit_key": f"file:{key}",
            "checkpoints": {"backend": "local", "path": str(tmp_path / "checkpoints.jsonl")},
        }
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Records]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'records.db'}"
    else:
        stack = request.getfixturevalue("stack")
        import psycopg

        name = f"rec_{uuid.uuid4().hex[:8]}"
        port = stack.port_base + 200
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"
    rec = Records.from_config(parse_config(_records_section(tmp_path, url)))
    rec.migrate()
    rec.migrate()  # idempotent
    yield rec
    rec.close()


def test_release_current_and_previous(records: Records) -> None:
    assert records.current_release("web", "production", "prd-1") is None
    records.record_release(service="web", environment="production", host="prd-1", version="1.0.0")
    records.record_release(service="web", environment="production", host="prd-1", version="1.1.0")
    records.record_release(service="web", environment="production", host="prd-2", version="1.1.0")
    cur = records.current_release("web", "production", "prd-1")
    prev = records.previous_release("web", "production", "prd-1")
    assert cur is not None and cur.version == "1.1.0"
    assert prev is not None and prev.version == "1.0.0"
    records.record_release(service="web", environment="production", host="prd-1", version="1.2.0")
    prev = records.previous_release("web", "production", "prd-1")
    assert prev is not None and prev.version == "1.1.0"
    states = sorted(
        (r.version, r.state) for r in records.releases("web", "production") if r.host == "prd-1"
    )
    assert states == [("1.0.0", "retired"), ("1.1.0", "previous"), ("1.2.0", "current")]


def test_incident_deduplicates_alerts(records: Records) -> None:
    first, created = records.open_incident(
        title="error rate", severity="critical", alert_key="error_rate/web"
    )
    again, created_again = records.open_incident(
        title="error rate", severity="critical", alert_key="error_rate/web"
    )
    assert created and not created_again and again.id == first.id
    _, timeline = records.incident(first.id)
    assert [e.phase for e in timeline] == ["detection", "detection"]
    assert "duplicate" in timeline[1].message


def test_backup_complete_only_when_finished(records: Records) -> None:
    b = records.start_backup(kind="database", name="app", key="db/app/1.dump")
    assert records.backups(states=["complete"]) == []
    records.finish_backup(
        b.id, state="complete", size=10, sha256="ab" * 32, manifest={"tables": {"t": 3}}
    )
    records.add_verification(b.id, ok=True, checks={"integrity": "ok"})
    done = records.backup(b.id)
    assert done.state == "complete" and done.verification == "verified"
    assert done.manifest == {"tables": {"t": 3}}


def _write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(_records_section(tmp_path, url)))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmpops.cli", *args], capture_output=True, text=True
    )


def test_audit_chain_detects_edit_and_delete(records: Records, tmp_path: Path) -> None:
    for i in range(5):
        records.audit(actor="alice", action="deploy.step", subject="web", details={"i": i})
    cfg = _write_config(tmp_path, records.url)
    ok = _cli("audit", "verify", "--config", str(cfg))
    assert ok.returncode == 0, ok.stderr
    assert "intact: 5 events" in ok.stdout

    anchored = _cli("audit", "checkpoint", "--config", str(cfg))
    assert anchored.returncode == 0, anchored.stderr
    exported = _cli("audit", "export", "--config", str(cfg))
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    events = [e for e in lines if e["type"] == "event"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert events[1]["prev_mac"] == events[0]["mac"]
    assert [(c["type"], c["seq"], c["mac"]) for c in lines[5:]] == [
        ("checkpoint", 5, events[4]["mac"])
    ]

    with records.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 3"))
    edited = _cli("audit", "verify", "--config", str(cfg))
    assert edited.returncode == 1
    assert "audit event #3: rewrite: does not match its HMAC tag" in edited.stderr

    with records.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'alice' WHERE seq = 3"))
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    deleted = _cli("audit", "verify", "--config", str(cfg))
    assert deleted.returncode == 1
    assert "audit event #2: deletion: missing" in deleted.stderr


def test_no_audit_key_fails_closed(tmp_path: Path) -> None:
    """Without records.audit_key nothing is appended and verify fails (exit 1)."""
    url = f"sqlite:///{tmp_path / 'nokey.db'}"
    rec = Records.from_config(parse_config({"records": {"url": url}}))
    rec.migrate()
    with pytest.raises(AuditKeyMissing, match=r"records\.audit_key is not configured"):
        rec.audit(actor="a", action="x", subject="s")
    assert rec.audit_events() == []
    cfg = tmp_path / "ops.yaml"
    cfg.write_text(yaml.safe_dump({"records": {"url": url}}))
    verify = _cli("audit", "verify", "--config", str(cfg))
    assert verify.returncode == 1
    assert "audit event #1: key: records.audit_key is not configured" in verify.stderr
    validate = _cli("validate", str(cfg))
    assert validate.returncode == 1
    assert "records.audit_key: not set" in validate.stderr


def test_audit_details_are_redacted(records: Records) -> None:
    from kmpops.redact import get_redactor

    get_redactor().add("hunter2-topsecret")
    records.audit(
        actor="a",
        action="x",
        subject="s",
        details={"note": "password is hunter2-topsecret", "url": "postgres://u:pw1234@h/db"},
    )
    ev = records.audit_events(action="x")[-1]
    dumped = json.dumps(ev.details)
    assert "hunter2-topsecret" not in dumped and "pw1234" not in dumped
    assert records.verify_audit().ok


def test_concurrent_appends_never_fork(records: Records) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: records.audit(actor="t", action="c", subject=str(i)), range(40)))
    report = records.verify_audit()
    assert report.ok and report.events == 40


def test_flagged_release_leaves_current_alone(records: Records) -> None:
    records.record_release(service="web", environment="production", host="prd-3", version="1.0.0")
    records.flag_release(
        service="web", environment="production", host="prd-3", version="1.1.0",
        state="rollback_failed",
    )  # fmt: skip
    cur = records.current_release("web", "production", "prd-3")
    assert cur is not None and cur.version == "1.0.0"
    assert [(r.host, r.version) for r in records.flagged_releases()] == [("prd-3", "1.1.0")]


def test_migrations_from_many_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = f"sqlite:///{tmp_path / 'threads.db'}"
    config = parse_config(_records_section(tmp_path, url))
    stores = [Records.from_config(config) for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda r: r.migrate(), stores))
    stores[0].audit(actor="t", action="m", subject="s")
    assert stores[-1].verify_audit().events == 1
