"""access-review, provision-access and rotate-service-keys against real sshd hosts.

Review and provisioning use the session stack's hosts and put every authorized_keys back as it
was; rotation runs on a dedicated two-host sshd fleet with its own key (ports 21301-21302: below
Linux's ephemeral range, where a client socket could hold them).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.access_review import AccessReviewRequest, access_review
from flows.provision_access import AccessChange, ProvisionFailed, provision_access
from flows.rotate_service_keys import RotationFailed, RotationRequest, rotate_service_keys
from kmpops.access import fingerprint_of_key_file, new_ed25519_keypair
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import AuthenticationFailed
from kmpops.plans.access import AccessGrant, AccessList
from tests.flows.ops_variant import ops_yaml_variant

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

KEYS = {name: new_ed25519_keypair(f"{name}@laptop")[1] for name in ("alice", "bob", "eve")}


def keys_file(host) -> Path:
    return Path(host.root) / "etc" / "authorized_keys"


@pytest.fixture
def restore_keys(stack):
    """Snapshot every stack host's authorized_keys; put them back after the test."""
    saved = {h.name: keys_file(h).read_text() for h in stack.hosts}
    yield saved
    for h in stack.hosts:
        keys_file(h).write_text(saved[h.name])


@pytest.fixture
def variant(monkeypatch, stack, tmp_path):
    return ops_yaml_variant(stack, tmp_path, monkeypatch)


def staging(stack) -> list:
    return [h for h in stack.hosts if h.environment == "staging"]


def test_access_review_names_unknown_and_missing_keys(stack, restore_keys) -> None:
    stg, prd = staging(stack), [h for h in stack.hosts if h.environment == "production"]
    with keys_file(stg[0]).open("a") as fh:
        fh.write(KEYS["alice"].line() + "\n")
    with keys_file(prd[0]).open("a") as fh:
        fh.write(KEYS["eve"].line() + "\n")
    access = AccessList(
        users=[
            AccessGrant(user="alice", public_keys=[KEYS["alice"].line()], environments=["staging"])
        ]
    )
    result = access_review(AccessReviewRequest(access=access))
    drift = {(d["host"], d["drift"], d["fingerprint"]) for d in result["drift"]}
    assert (prd[0].name, "unknown-key", KEYS["eve"].fingerprint) in drift
    assert (stg[1].name, "missing-key", KEYS["alice"].fingerprint) in drift
    alice = [d for d in drift if d[2] == KEYS["alice"].fingerprint]
    assert alice == [(stg[1].name, "missing-key", KEYS["alice"].fingerprint)]
    unknown = next(d for d in result["drift"] if d["drift"] == "unknown-key")
    assert unknown["comment"] == "eve@laptop"
    service = [i for i in result["inventory"] if i["user"] == "kmp-ops (service)"]
    assert {i["host"] for i in service} == {h.name for h in stack.hosts}


def test_provision_then_remove_on_staging(stack, restore_keys) -> None:
    bob = KEYS["bob"]
    change = AccessChange(user="bob", public_key=bob.public_line(), environment="staging")
    plan = provision_access(change.model_copy(update={"dry_run": True}))
    assert all(row["changes"] for row in plan["plan"])
    assert all(bob.key_b64 not in keys_file(h).read_text() for h in staging(stack))

    added = provision_access(change)
    assert sorted(added["changed"]) == sorted(h.name for h in staging(stack))
    for h in staging(stack):
        assert bob.key_b64 in keys_file(h).read_text()
        assert restore_keys[h.name].strip() in keys_file(h).read_text()
    for h in stack.hosts:
        if h.environment != "staging":
            assert bob.key_b64 not in keys_file(h).read_text()
    again = provision_access(change)
    assert again["changed"] == []

    provision_access(change.model_copy(update={"action": "remove"}))
    for h in staging(stack):
        assert keys_file(h).read_text() == restore_keys[h.name]


def test_failed_host_rolls_every_host_back(stack, restore_keys, variant) -> None:
    stg = staging(stack)

    def break_second(data: dict) -> None:
        host = data["environments"]["staging"]["hosts"][1]
        host["vars"]["authorized_keys"] = "/nonexistent-kmpops-dir/authorized_keys"

    variant(break_second)
    change = AccessChange(user="bob", public_key=KEYS["bob"].public_line(), environment="staging")
    with pytest.raises(ProvisionFailed, match="all hosts restored"):
        provision_access(change)
    for h in stg:
        assert keys_file(h).read_text() == restore_keys[h.name]


def requester_confirmation() -> dict:
    """dave's confirmation of the request he filed, with his own token."""
    from tests.conftest import STACK_ROOT

    token = (STACK_ROOT / "secrets" / "approver-dave.token").read_text().strip()
    return {"decision": "confirm", "approver": "dave", "reason": "", "approver_token": token}


def answer_approval(subject_prefix: str, answer: dict) -> threading.Thread:
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from tasks.common import records

    errors: list[BaseException] = []

    def work() -> None:
        try:
            deadline = time.monotonic() + 60
            run_id = None
            while run_id is None and time.monotonic() < deadline:
                pending = [
                    a
                    for a in records().approvals()
                    if a.outcome == "pending" and a.subject.startswith(subject_prefix)
                ]
                run_id = pending[-1].run_id if pending else None
                time.sleep(0.2)
            from kmpops.approve import pending_request

            seen: set = set()
            # the requester (dave) confirms the change with his own token, then the approver
            for one in (requester_confirmation(), answer):
                with get_client(sync_client=True) as client:
                    while True:
                        state = client.read_flow_run(run_id).state
                        if state.is_paused() and state.id not in seen:
                            seen.add(state.id)
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError("run did not pause")
                        time.sleep(0.1)
                code = pending_request(os.environ["PREFECT_API_URL"], run_id).request_code
                resume_flow_run(run_id, run_input={**one, "request_code": code})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_production_needs_approval(stack, restore_keys) -> None:
    from kmpops.stack import approver_token

    prd = [h for h in stack.hosts if h.environment == "production"]
    carol = new_ed25519_keypair("carol@laptop")[1]
    change = AccessChange(
        user="carol",
        public_key=carol.public_line(),
        environment="production",
        requested_by="dave",
        reason="on-call rotation",
    )
    answering = answer_approval(
        "access add carol",
        {
            "decision": "approve",
            "approver": "alice",
            "reason": "ok",
            "approver_token": approver_token(Path(stack.root), "alice"),
        },
    )
    result = provision_access(change)
    answering.join(10)
    assert not answering.errors, answering.errors  # type: ignore[attr-defined]
    assert sorted(result["changed"]) == sorted(h.name for h in prd)
    assert all(carol.key_b64 in keys_file(h).read_text() for h in prd)


# -- rotation on a dedicated fleet ----------------------------------------------------------


@pytest.fixture
def rotation_fleet(stack, tmp_path, monkeypatch):
    from kmpops.stack import sshd

    root = tmp_path / "fleet"
    infos = sshd.start_fleet(root, ["rot-1", "rot-2"], [21301, 21302])
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    cfg = {
        "project": "kmp",
        "records": data["records"],  # its checkpoints go to the stack's S3 (with the storage)
        "storage": data["storage"],
        "environments": {
            "staging": {
                "hosts": [
                    {
                        "name": i.name,
                        "address": i.address,
                        "port": i.port,
                        "user": i.user,
                        "key_file": str(i.key_file),
                        "known_hosts": str(i.known_hosts),
                        "vars": {"root": str(i.root)},
                    }
                    for i in infos
                ]
            }
        },
    }

    def use(mutate=None) -> None:
        body = yaml.safe_load(yaml.safe_dump(cfg))
        if mutate:
            mutate(body)
        path = tmp_path / "rotation-ops.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        monkeypatch.setenv("KMPOPS_CONFIG", str(path))

    use()
    yield infos, use
    sshd.stop_fleet(root)


def login(info, key_file: Path) -> bool:
    conn = SSHConnection(
        name=info.name,
        address=info.address,
        port=info.port,
        user=info.user,
        key_file=key_file,
        known_hosts=info.known_hosts,
    )
    try:
        with conn:
            return conn.run(["true"], timeout=20).ok
    except AuthenticationFailed:
        return False


def test_rotation_new_key_logs_in_old_key_refused(rotation_fleet, tmp_path) -> None:
    infos, _use = rotation_fleet
    key_file = infos[0].key_file
    old_copy = tmp_path / "old_key"
    shutil.copy(key_file, old_copy)
    old_fp = fingerprint_of_key_file(key_file)

    result = rotate_service_keys(RotationRequest(comment="kmp-ops-test"))
    (group,) = result["rotated"]
    assert group["old"] == old_fp and group["new"] != old_fp
    assert fingerprint_of_key_file(key_file) == group["new"]
    assert group["old_refused"] == {"rot-1": True, "rot-2": True}
    for info in infos:
        assert login(info, key_file)
        assert not login(info, old_copy)
        text = (info.root / "etc" / "authorized_keys").read_text()
        assert "kmp-ops-test" in text and text.count("ssh-ed25519") == 1
    assert not list(key_file.parent.glob(".*rotating*"))
    artifacts = str(result)
    assert "PRIVATE KEY" not in artifacts


def test_rotation_failure_rolls_back_to_old_key(rotation_fleet) -> None:
    infos, use = rotation_fleet
    key_file = infos[0].key_file
    before = key_file.read_bytes()
    saved = {i.name: (i.root / "etc" / "authorized_keys").read_text() for i in infos}

    def misplace(data: dict) -> None:
        # rot-2's keys go to a file its sshd does not read: the new key cannot log in there
        data["environments"]["staging"]["hosts"][1]["vars"]["authorized_keys"] = str(
            infos[1].root / "etc" / "not_read_by_sshd"
        )

    use(misplace)
    with pytest.raises(RotationFailed, match="log in with new key"):
        rotate_service_keys()
    assert key_file.read_bytes() == before
    for info in infos:
        assert (info.root / "etc" / "authorized_keys").read_text() == saved[info.name]
        assert login(info, key_file)
    assert (infos[1].root / "etc" / "not_read_by_sshd").read_text() == ""
    assert not list(key_file.parent.glob(".*rotating*"))
