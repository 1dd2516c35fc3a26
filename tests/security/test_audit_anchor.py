"""The anchored audit trail against someone who can write the records database (issue #10).

Records live on the stack's PostgreSQL and on SQLite; checkpoints go to the stack's SeaweedFS
bucket created with Object Lock (COMPLIANCE), or to the append-only local file. The attacker
edits the database with plain SQL and, for the rewrite, recomputes the chain consistently the
way the old scheme did (sha256, no key). What a user sees is `kmpops audit verify`'s output and
exit code, and the S3 API's refusal to delete a locked checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config
from botocore.exceptions import ClientError
from sqlalchemy import text

from kmpops.config import load_config
from kmpops.records import Records

pytestmark = pytest.mark.stack


@dataclass
class Chain:
    """A records store of its own with four audit events, and the ops.yaml that describes it."""

    records: Records
    ops_yaml: Path
    prefix: str | None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmpops.cli", *args], capture_output=True, text=True, timeout=120
    )


def _verify(chain: Chain) -> subprocess.CompletedProcess[str]:
    return _cli("audit", "verify", "--config", str(chain.ops_yaml))


def _s3(stack: Any) -> Any:
    root = Path(stack.root)
    return boto3.client(
        "s3",
        endpoint_url=stack.s3["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id=(root / "secrets" / "s3_access_key").read_text().strip(),
        aws_secret_access_key=(root / "secrets" / "s3_secret_key").read_text().strip(),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _new_database(stack: Any) -> str:
    import psycopg

    name = f"audit_{uuid.uuid4().hex[:8]}"
    port = stack.port_base + 200
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"


@pytest.fixture(params=["postgresql+s3", "sqlite+local"])
def chain(request: pytest.FixtureRequest, stack: Any, tmp_path: Path) -> Iterator[Chain]:
    """Four events on a chain of its own; checkpoints on SeaweedFS (a prefix of its own) or in
    the local append-only file next to the SQLite database."""
    base = yaml.safe_load(Path(stack.ops_yaml).read_text())
    key = tmp_path / "audit_key"
    key.write_text(secrets.token_hex(32) + "\n")
    prefix = None
    if request.param == "postgresql+s3":
        prefix = f"test-checkpoints/{uuid.uuid4().hex[:8]}/"
        records = {
            "url": _new_database(stack),
            "audit_key": f"file:{key}",
            "checkpoints": {**base["records"]["checkpoints"], "prefix": prefix},
        }
    else:
        records = {"url": f"sqlite:///{tmp_path / 'records.db'}", "audit_key": f"file:{key}"}
    ops_yaml = tmp_path / "ops.yaml"
    ops_yaml.write_text(yaml.safe_dump({"records": records, "storage": base["storage"]}))
    rec = Records.from_config(load_config(ops_yaml))
    rec.migrate()
    for i in range(1, 5):
        rec.audit(actor="alice", action="deploy.step", subject="web", details={"step": i})
    yield Chain(rec, ops_yaml, prefix)
    rec.close()


def _old_scheme_hash(row: Any, prev: str) -> str:
    """What the chain used before: sha256 over the canonical event, no key (anyone can do it)."""
    body = json.dumps(
        {
            "seq": row.seq,
            "ts": row.ts.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": row.actor,
            "action": row.action,
            "subject": row.subject,
            "details": row.details,
            "run_id": row.run_id,
            "prev_hash": prev,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _rewrite_without_key(records: Records, *, from_seq: int, actor: str) -> None:
    """Change every event from ``from_seq`` on and re-chain them consistently with sha256."""
    events = records.audit_events()
    prev = events[from_seq - 2].hash if from_seq > 1 else "0" * 64
    with records.engine.begin() as conn:
        # hash is unique: move the old values out of the way first
        conn.execute(
            text(
                "UPDATE audit_events SET hash = 'x' || seq, prev_hash = 'y' || seq WHERE seq >= :s"
            ),
            {"s": from_seq},
        )
        for ev in events[from_seq - 1 :]:
            ev.actor = actor
            digest = _old_scheme_hash(ev, prev)
            conn.execute(
                text(
                    "UPDATE audit_events SET actor = :a, prev_hash = :p, hash = :h WHERE seq = :s"
                ),
                {"a": actor, "p": prev, "h": digest, "s": ev.seq},
            )
            prev = digest


def test_intact_chain_verifies_with_its_checkpoint(chain: Chain) -> None:
    anchored = _cli("audit", "checkpoint", "--config", str(chain.ops_yaml))
    assert anchored.returncode == 0, anchored.stderr
    assert "checkpoint of seq 4 written to" in anchored.stdout
    ok = _verify(chain)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "audit chain intact: 4 events, 1 checkpoint(s) matched"


def test_truncated_chain_is_reported_naming_the_first_missing_event(chain: Chain) -> None:
    chain.records.checkpoint_audit("before the attack")
    with chain.records.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > 2"))

    cut = _verify(chain)
    print(cut.stderr)
    assert cut.returncode == 1
    assert "audit chain BROKEN at audit event #3: truncation: the checkpoint of " in cut.stderr
    assert "(seq 4) saw 4 events, the records hold 2; event #3 is the first missing" in cut.stderr


def test_truncated_then_appended_chain_no_longer_matches_its_checkpoint(chain: Chain) -> None:
    """Cut to 2, then kmp-ops appends two new events with the key: as long as before, but not
    the chain the checkpoint saw."""
    chain.records.checkpoint_audit("before the attack")
    with chain.records.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > 2"))
    for i in (3, 4):
        chain.records.audit(actor="bob", action="later", subject="web", details={"i": i})

    replaced = _verify(chain)
    assert replaced.returncode == 1
    assert "audit event #1: rewrite: events #1..#4 no longer match the checkpoint of" in (
        replaced.stderr
    )


@pytest.mark.parametrize("from_seq", [1, 3])
def test_chain_rewritten_consistently_without_the_key_is_reported(
    chain: Chain, from_seq: int
) -> None:
    _rewrite_without_key(chain.records, from_seq=from_seq, actor="mallory")
    assert {e.actor for e in chain.records.audit_events()[from_seq - 1 :]} == {"mallory"}

    rewritten = _verify(chain)
    print(rewritten.stderr)
    assert rewritten.returncode == 1
    assert (
        f"audit chain BROKEN at audit event #{from_seq}: rewrite: does not match its HMAC tag "
        "(changed, or the chain was recomputed without the audit key)"
    ) in rewritten.stderr


def test_deleted_middle_event_is_reported(chain: Chain) -> None:
    chain.records.checkpoint_audit("before the attack")
    with chain.records.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))

    gap = _verify(chain)
    assert gap.returncode == 1
    assert (
        "audit chain BROKEN at audit event #2: deletion: missing: deleted "
        "(the next present event is #3)"
    ) in gap.stderr


def test_export_includes_the_checkpoints(chain: Chain) -> None:
    first, _ = chain.records.checkpoint_audit("first")
    chain.records.audit(actor="alice", action="deploy.step", subject="web", details={"step": 5})
    second, _ = chain.records.checkpoint_audit("second")
    exported = _cli("audit", "export", "--config", str(chain.ops_yaml))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [(x["type"], x["seq"]) for x in lines] == [
        ("event", 1),
        ("event", 2),
        ("event", 3),
        ("event", 4),
        ("event", 5),
        ("checkpoint", 4),
        ("checkpoint", 5),
    ]
    assert [(x["mac"], x["sig"]) for x in lines[5:]] == [
        (first.mac, first.sig),
        (second.mac, second.sig),
    ]


def _s3_chain(stack: Any, tmp_path: Path) -> tuple[Records, Path, str]:
    """Four events on PostgreSQL, checkpoints in the lock bucket under a prefix of their own."""
    base = yaml.safe_load(Path(stack.ops_yaml).read_text())
    key = tmp_path / "audit_key"
    key.write_text(secrets.token_hex(32))
    prefix = f"test-checkpoints/lock-{uuid.uuid4().hex[:8]}/"
    records = {
        "url": _new_database(stack),
        "audit_key": f"file:{key}",
        "checkpoints": {**base["records"]["checkpoints"], "prefix": prefix},
    }
    ops_yaml = tmp_path / "ops.yaml"
    ops_yaml.write_text(yaml.safe_dump({"records": records, "storage": base["storage"]}))
    rec = Records.from_config(load_config(ops_yaml))
    rec.migrate()
    for i in range(4):
        rec.audit(actor="alice", action="deploy.step", subject="web", details={"i": i})
    return rec, ops_yaml, base["records"]["checkpoints"]["bucket"]


def test_old_checkpoint_copied_under_a_newer_name_is_reported(stack: Any, tmp_path: Path) -> None:
    """Verify reads the newest checkpoints by the seq in their names: a genuine old checkpoint
    copied under a higher seq's name (to push the real newest out of sight) is reported."""
    rec, ops_yaml, bucket = _s3_chain(stack, tmp_path)
    _, where = rec.checkpoint_audit("genuine")
    object_key, version = where.split("@")
    s3 = _s3(stack)
    body = s3.get_object(Bucket=bucket, Key=object_key, VersionId=version)["Body"].read()
    copy_key = object_key.rsplit("/", 1)[0] + "/000000000009-20990101T000000000000Z-copy.json"
    s3.put_object(Bucket=bucket, Key=copy_key, Body=body)

    copied = _cli("audit", "verify", "--config", str(ops_yaml))
    assert copied.returncode == 1
    assert f"{copy_key}@" in copied.stderr
    assert "(seq 4) is stored under the name of seq 9: a copy" in copied.stderr
    rec.close()


def test_locked_checkpoint_cannot_be_deleted_or_overwritten_on_seaweedfs(
    stack: Any, tmp_path: Path
) -> None:
    """The S3 API refuses to delete a COMPLIANCE-locked checkpoint or shorten its lock; a put to
    the same key only adds a version, and verify still reads the locked one."""
    rec, ops_yaml, bucket = _s3_chain(stack, tmp_path)
    checkpoint, where = rec.checkpoint_audit("to be attacked")
    object_key, version = where.split("@")
    s3 = _s3(stack)
    original = s3.get_object(Bucket=bucket, Key=object_key, VersionId=version)["Body"].read()
    lock = s3.get_object_retention(Bucket=bucket, Key=object_key, VersionId=version)["Retention"]
    assert lock["Mode"] == "COMPLIANCE"
    assert lock["RetainUntilDate"] > datetime.now(UTC) + timedelta(days=399)

    with pytest.raises(ClientError) as deleted:
        s3.delete_object(Bucket=bucket, Key=object_key, VersionId=version)
    print("delete the locked version:", deleted.value)
    assert deleted.value.response["Error"]["Code"] == "AccessDenied"

    with pytest.raises(ClientError) as bypass:
        s3.delete_object(
            Bucket=bucket, Key=object_key, VersionId=version, BypassGovernanceRetention=True
        )
    print("delete with governance bypass:", bypass.value)
    assert bypass.value.response["Error"]["Code"] == "AccessDenied"

    with pytest.raises(ClientError) as shortened:
        s3.put_object_retention(
            Bucket=bucket,
            Key=object_key,
            VersionId=version,
            Retention={
                "Mode": "COMPLIANCE",
                "RetainUntilDate": datetime.now(UTC) + timedelta(days=1),
            },
        )
    print("shorten the lock:", shortened.value)
    assert shortened.value.response["Error"]["Code"] == "AccessDenied"

    with pytest.raises(ClientError) as governance:
        s3.put_object_retention(
            Bucket=bucket,
            Key=object_key,
            VersionId=version,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": lock["RetainUntilDate"]},
            BypassGovernanceRetention=True,
        )
    print("downgrade to GOVERNANCE:", governance.value)
    assert governance.value.response["Error"]["Code"] == "AccessDenied"

    with pytest.raises(ClientError) as conditional:
        s3.put_object(Bucket=bucket, Key=object_key, Body=b"{}", IfNoneMatch="*")
    print("conditional overwrite (how kmp-ops writes):", conditional.value)
    assert conditional.value.response["Error"]["Code"] == "PreconditionFailed"

    # an attacker's plain put and delete: a new version and a delete marker, nothing replaced
    forged = json.loads(original)
    forged["seq"] = 2
    s3.put_object(Bucket=bucket, Key=object_key, Body=json.dumps(forged).encode())
    s3.delete_object(Bucket=bucket, Key=object_key)
    still = s3.get_object(Bucket=bucket, Key=object_key, VersionId=version)["Body"].read()
    assert still == original

    with rec.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > 2"))
    cut = _cli("audit", "verify", "--config", str(ops_yaml))
    print(cut.stderr)
    assert cut.returncode == 1
    assert f"saw {checkpoint.seq} events, the records hold 2; event #3 is the first missing" in (
        cut.stderr
    )
    assert "has a bad signature (forged, or signed with another key" in cut.stderr
    rec.close()


def test_checkpoints_refuse_a_bucket_without_object_lock(stack: Any, tmp_path: Path) -> None:
    """A bucket without Object Lock would not be write-once: nothing is written there."""
    base = yaml.safe_load(Path(stack.ops_yaml).read_text())
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    _s3(stack).create_bucket(Bucket=plain)
    key = tmp_path / "audit_key"
    key.write_text(secrets.token_hex(32))
    records = {
        "url": f"sqlite:///{tmp_path / 'records.db'}",
        "audit_key": f"file:{key}",
        "checkpoints": {"backend": "s3", "bucket": plain},
    }
    ops_yaml = tmp_path / "ops.yaml"
    ops_yaml.write_text(yaml.safe_dump({"records": records, "storage": base["storage"]}))
    rec = Records.from_config(load_config(ops_yaml))
    rec.migrate()
    rec.audit(actor="alice", action="x", subject="s")
    refused = _cli("audit", "checkpoint", "--config", str(ops_yaml))
    assert refused.returncode == 1
    assert f"bucket {plain!r} has no Object Lock" in refused.stderr
    assert _s3(stack).list_objects_v2(Bucket=plain).get("KeyCount", 0) == 0
    rec.close()


def test_audit_checkpoint_flow_anchors_the_stack_chain(stack: Any) -> None:
    """The scheduled flow on the stack's own config: a locked object per run, verify passes."""
    from flows.audit_checkpoint import audit_checkpoint

    cfg = load_config(Path(stack.ops_yaml))
    rec = Records.from_config(cfg)
    rec.migrate()
    rec.audit(actor="pytest", action="test.anchor", subject="stack")
    result = audit_checkpoint(reason="test")
    object_key, version = result["where"].split("@")
    assert object_key.startswith("audit-checkpoints/")
    lock = _s3(stack).get_object_retention(
        Bucket=cfg.records.checkpoints.bucket, Key=object_key, VersionId=version
    )["Retention"]
    assert lock["Mode"] == "COMPLIANCE"
    ok = _cli("audit", "verify", "--config", stack.ops_yaml)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("audit chain intact: ")
    # the stack's key: outside the records, created 0600, never printed
    key_file = Path(stack.root) / "secrets" / "audit_key"
    assert str(cfg.records.audit_key) == f"file:{key_file}"
    assert key_file.stat().st_mode & 0o777 == 0o600
    exported = _cli("audit", "export", "--config", stack.ops_yaml)
    key = key_file.read_text().strip()
    assert key not in ok.stdout + ok.stderr + exported.stdout + exported.stderr + str(result)
    rec.close()


def test_store_put_locked_writes_once_and_reads_back_its_lock(stack: Any) -> None:
    """The connector's write-once put: a second put to the key is refused, the lock is read back,
    and ``list_versions`` still lists a version hidden behind a delete marker."""
    from kmpops.connectors.storage import S3Store
    from kmpops.errors import ConnectorError

    cfg = load_config(Path(stack.ops_yaml))
    root = Path(stack.root)
    store = S3Store(
        bucket=cfg.records.checkpoints.bucket,
        endpoint_url=stack.s3["endpoint_url"],
        access_key_id=(root / "secrets" / "s3_access_key").read_text().strip(),
        secret_access_key=(root / "secrets" / "s3_secret_key").read_text().strip(),
    )
    key = f"test-locked/{uuid.uuid4().hex[:8]}.json"
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    assert store.object_lock_enabled()
    locked = store.put_locked(key, b'{"a":1}', retain_until=until)
    assert store.retention(key, locked.version_id) == ("COMPLIANCE", until)
    with pytest.raises(ConnectorError, match="PreconditionFailed"):
        store.put_locked(key, b'{"a":2}', retain_until=until)
    store.delete(key)  # a delete marker; the locked version stays
    assert (key, locked.version_id) in store.list_versions("test-locked/")
    assert store.get_version(key, locked.version_id) == b'{"a":1}'
    main = S3Store(
        bucket=cfg.storage.bucket,
        endpoint_url=stack.s3["endpoint_url"],
        access_key_id=(root / "secrets" / "s3_access_key").read_text().strip(),
        secret_access_key=(root / "secrets" / "s3_secret_key").read_text().strip(),
    )
    assert not main.object_lock_enabled()
