"""update-management on the real stack: a patch through the deploy pipeline, and a failed one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from flows.update_management import UpdateRequest, classify_bump, update_management
from tests.flows.traffic import user_traffic

pytestmark = [pytest.mark.stack, pytest.mark.prefect]


@pytest.mark.parametrize(
    ("old", "new", "bump"),
    [
        (None, "1.0.0", "first install"),
        ("1.0.0", "1.0.1", "patch"),
        ("1.0.9", "1.1.0", "minor"),
        ("1.4.2", "2.0.0", "major"),
        ("2.0.0", "1.9.9", "other"),
        ("1.0.0", "build-7", "other"),
    ],
)
def test_classify_bump(old, new, bump) -> None:
    assert classify_bump(old, new) == bump


@pytest.fixture
def no_approval(monkeypatch, stack, tmp_path):
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["environments"]["production"]["policy"].update(approval_required=False)
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(path))


def publish_release(stack, version: str, tmp_path: Path) -> None:
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    tarball = build_release(version, tmp_path)
    put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
    for gate, record in ci_evidence(version, put.sha256).items():
        store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())


def notifications(stack) -> list[dict]:
    from kmpops.connectors.notify import read_sink

    return read_sink(stack.notifications)


def current_of(host) -> str | None:
    link = Path(host.root) / "srv" / "web" / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def test_patch_update_is_notified_rolled_out_and_documented(stack, no_approval, tmp_path) -> None:
    from tasks.common import records

    publish_release(stack, "9.1.1", tmp_path)
    before = len(notifications(stack))
    with user_traffic(stack):  # production's users: what each batch's bake judges
        result = update_management(
            UpdateRequest(
                service="web",
                version="9.1.1",
                kind="security",
                description="fixes CVE-0000-0001",
                requested_by="dave",
                allow_first_install=True,
                bake_seconds=0,
            )
        )
    assert result["status"] == "deployed"
    assert {current_of(h) for h in stack.hosts} == {"9.1.1"}
    assert result["impact"]["environments"] == ["staging", "production"]
    assert len(result["impact"]["hosts"]) == len(stack.hosts)
    titles = [n.get("title", "") for n in notifications(stack)[before:]]
    start = titles.index("Update scheduled: web@9.1.1->production")
    end = titles.index("Update deployed: web@9.1.1->production")
    assert start < end
    documented = records().audit_events(action="update.documented", subject="web@9.1.1->production")
    assert documented[-1].details["status"] == "deployed"


def test_failed_update_is_documented_and_notified(stack, no_approval) -> None:
    from tasks.common import records

    before = len(notifications(stack))
    with pytest.raises(Exception):  # noqa: B017 (whatever the pipeline raises is re-raised)
        update_management(
            UpdateRequest(service="web", version="9.9.404", requested_by="dave", bake_seconds=0)
        )
    sent = notifications(stack)[before:]
    failed = [n for n in sent if n.get("title") == "Update failed: web@9.9.404->production"]
    assert failed and failed[0]["severity"] == "critical"
    documented = records().audit_events(
        action="update.documented", subject="web@9.9.404->production"
    )
    assert documented[-1].details["status"] == "failed"
    assert documented[-1].details["error"]
