"""compliance-audit on the real stack: sshd probes, records, ops.yaml variants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.compliance_audit import CompliancePolicy, compliance_audit, find_secret_literals
from kmpops.errors import PolicyViolation
from tests.flows.ops_variant import ops_yaml_variant

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


def by_check(result: dict) -> dict[tuple[str, str], dict]:
    return {(c["check"], c["subject"]): c for c in result["checks"]}


@pytest.fixture
def variant(monkeypatch, stack, tmp_path):
    """Run against a mutated copy of the stack's ops.yaml (same records, same hosts)."""
    return ops_yaml_variant(stack, tmp_path, monkeypatch)


def test_find_secret_literals_names_fields_not_values() -> None:
    data = {
        "storage": {"access_key_id": "file:/x", "secret_access_key": "AKIA-literal"},
        "databases": {"app": {"password": "env:PW"}},
        "notifications": {"routes": {"critical": ["mailto://ops:hunter2@example.org"]}},
        "environments": {"p": {"hosts": [{"key_file": "/k", "known_hosts": "/kh"}]}},
    }
    found = find_secret_literals(data)
    assert found == ["storage.secret_access_key", "notifications.routes.critical[0]"]
    assert "hunter2" not in " ".join(found)


def with_ghost_database(data: dict) -> None:
    """A database nobody ever backed up (other tests may have backed up ``app``)."""
    data["databases"]["ghost"] = {"kind": "postgresql", "dbname": "ghost", "rpo": "25h"}


def test_stack_passes_host_checks_and_flags_missing_backup(stack, variant) -> None:
    from tasks.common import records

    variant(with_ghost_database)
    before = len(records().audit_events(action="compliance.audit"))
    result = compliance_audit()
    checks = by_check(result)
    hosts = [h.name for h in stack.hosts]
    for name in hosts:
        assert checks[("host key pinned", name)]["ok"], checks[("host key pinned", name)]
        key_only = checks[("sshd key-only auth", name)]
        assert key_only["ok"] and key_only["evidence"] == "server offers: publickey"
    assert checks[("audit chain intact", "")]["ok"]
    assert checks[("production approval policy", "production")]["ok"]
    assert checks[("secrets are references", "")]["ok"]
    rpo = checks[("backup within RPO", "ghost")]
    assert not rpo["ok"] and "no verified backup" in rpo["evidence"]
    assert not result["passed"]
    events = records().audit_events(action="compliance.audit")
    assert len(events) == before + 1
    assert events[-1].details["passed"] is False
    assert "backup within RPO ghost" in events[-1].details["failed"]


def test_fail_on_critical_raises_after_publishing(stack, variant) -> None:
    variant(with_ghost_database)
    with pytest.raises(PolicyViolation, match="backup within RPO ghost"):
        compliance_audit(CompliancePolicy(fail_on_critical=True, check_hosts=False))


def test_verified_backup_within_rpo_passes(stack) -> None:
    from tasks.common import records

    rec = records()
    row = rec.start_backup(kind="database", name="app", key="test/compliance/app.dump")
    rec.finish_backup(row.id, state="complete", size=1, sha256="0" * 64)
    rec.add_verification(row.id, ok=True, checks={"test": "compliance"})
    try:
        result = compliance_audit(CompliancePolicy(check_hosts=False))
        rpo = by_check(result)[("backup within RPO", "app")]
        assert rpo["ok"], rpo
    finally:
        # an old timestamp takes it out of every later RPO computation by other tests
        rec.update_backup(
            row.id, state="failed", started_at=datetime.now(UTC) - timedelta(days=400)
        )


def test_weak_production_policy_and_literal_secret_fail(stack, variant) -> None:
    def weaken(data: dict) -> None:
        policy = data["environments"]["production"]["policy"]
        policy["four_eyes"] = False
        policy["approvers"] = ["alice"]
        data["databases"]["app"]["password"] = "plain-text-pw"

    variant(weaken)
    result = compliance_audit(CompliancePolicy(check_hosts=False))
    checks = by_check(result)
    prod = checks[("production approval policy", "production")]
    assert not prod["ok"]
    assert "four_eyes is off" in prod["evidence"] and "1 approvers listed" in prod["evidence"]
    secrets = checks[("secrets are references", "")]
    assert not secrets["ok"] and secrets["evidence"] == "literal secret in: databases.app.password"
    assert "plain-text-pw" not in str(result)


def test_unpinned_host_key_fails(stack, variant, tmp_path) -> None:
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")

    def unpin(data: dict) -> None:
        for host in data["environments"]["staging"]["hosts"]:
            host["known_hosts"] = str(empty)

    variant(unpin)
    result = compliance_audit()
    checks = by_check(result)
    staging = [h.name for h in stack.hosts if h.environment == "staging"]
    for name in staging:
        assert not checks[("host key pinned", name)]["ok"]
        assert "no entry" in checks[("host key pinned", name)]["evidence"]
    prod = [h.name for h in stack.hosts if h.environment == "production"]
    assert all(checks[("host key pinned", n)]["ok"] for n in prod)


def test_tampered_audit_chain_is_a_critical_failure(stack, variant, tmp_path) -> None:
    """On a records store of its own: the shared chain must stay intact for other tests."""
    from pathlib import Path

    import sqlalchemy as sa

    from kmpops.config import load_config, parse_config
    from kmpops.records import Records

    url = f"sqlite:///{tmp_path / 'records.db'}"
    key_ref = load_config(Path(stack.ops_yaml)).records.audit_key
    rec = Records.from_config(parse_config({"records": {"url": url, "audit_key": key_ref}}))
    rec.migrate()
    for i in range(3):
        rec.audit(actor="pytest", action="test.event", subject=f"s{i}", details={"i": i})
    with rec.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_events SET subject = 'edited' WHERE seq = 2"))
    rec.close()

    variant(lambda data: data.update(records={"url": url, "audit_key": str(key_ref)}))
    result = compliance_audit(CompliancePolicy(check_hosts=False))
    chain = by_check(result)[("audit chain intact", "")]
    assert not chain["ok"]
    assert chain["evidence"] == (
        "audit event #2: rewrite: does not match its HMAC tag (changed, or the chain was "
        "recomputed without the audit key)"
    )
    assert "audit chain intact" in result["critical_failures"]
