"""deploy-pipeline on the session stack's hosts reached only through a bastion that accepts
nothing but a CA-signed user key, logged in as the stack's non-root deploy user that restarts
the service as root through sudo -n: a deploy, then a bad release rolled back, every connection
seen in the bastion's log; a command no sudo rule allows stops the rollout before anything is
switched, naming the command and the host."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PORT_BASE

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

BASTION_PORT = PORT_BASE + 813


def current_of(host_root: str) -> str | None:
    link = Path(host_root) / "srv" / "web" / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


@pytest.fixture(scope="module")
def bastion(stack, tmp_path_factory):
    """A bastion (DEBUG1 log, forwarding on) trusting only certificates of a user CA; the
    stack's client key is copied and certified for it."""
    from kmpops.stack.sshd import SSHDOptions, new_key_pair, sign_key, start_fleet, stop_fleet

    root = tmp_path_factory.mktemp("bastion")
    keys = root / "keys"
    keys.mkdir()
    key = keys / "id_ed25519"
    shutil.copyfile(stack.key_file, key)
    key.chmod(0o600)
    shutil.copyfile(f"{stack.key_file}.pub", keys / "id_ed25519.pub")
    new_key_pair(root / "user_ca", "user-ca")
    # the hop logs in as the hosts' user: the stack's non-root deploy user
    user = stack.deploy_user or __import__("pwd").getpwuid(os.getuid()).pw_name
    cert = sign_key(
        root / "user_ca", keys / "id_ed25519.pub", identity="kmpops-deploy", principals=[user]
    )
    try:
        info = start_fleet(
            root,
            ["bastion"],
            [BASTION_PORT],
            options=SSHDOptions(
                allow_tcp_forwarding=True,
                log_level="DEBUG1",
                trusted_user_ca=root / "user_ca.pub",
                authorize_client_key=False,
            ),
        )[0]
        yield {"info": info, "key": key, "cert": cert, "known_hosts": root / "known_hosts"}
    finally:
        stop_fleet(root)


@pytest.fixture(scope="module")
def releases(stack, tmp_path_factory):
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    out = tmp_path_factory.mktemp("bastion-releases")
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    for version, variant in {"11.0.0": "good", "11.1.0": "unhealthy", "11.2.0": "good"}.items():
        tarball = build_release(version, out, variant=variant)
        put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())


@pytest.fixture
def through_bastion(stack, bastion, tmp_path, monkeypatch):
    """The stack's ops.yaml, production only, every host behind the bastion (the hop logs in
    with the certified key; the hosts with their usual key)."""
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["environments"].pop("staging")
    data["environments"]["production"]["policy"].update(approval_required=False)
    data["services"]["web"].pop("analysis")  # no users here: deploys on health checks alone
    hop = {
        "address": "127.0.0.1",
        "port": BASTION_PORT,
        "known_hosts": str(bastion["known_hosts"]),
        "key_file": str(bastion["key"]),
        "certificate": str(bastion["cert"]),
    }
    for host in data["environments"]["production"]["hosts"]:
        host["jump"] = [hop]
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KMPOPS_CONFIG", str(path))
    return [h for h in stack.hosts if h.environment == "production"]


def service_uid(host_root: str) -> int:
    """The real uid of the sample service's process on a host (from its pid file)."""
    pid = (Path(host_root) / "srv" / "web" / "shared" / "run" / "web.pid").read_text().strip()
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def owner(path: Path) -> str:
    return pwd.getpwuid(path.lstat().st_uid).pw_name


def forwarded(bastion, port: int) -> int:
    return bastion["info"].log_file.read_text().count(f"target 127.0.0.1 port {port}")


def forwarded_beyond(bastion, hosts, before: dict[str, int], timeout: float = 15.0) -> dict:
    """Per host, the bastion's count of forwards to it, once every host's count went past
    ``before`` (each session's sshd child writes its own log line: wait for it, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        now = {h.name: forwarded(bastion, h.port) for h in hosts}
        if all(now[n] > before[n] for n in now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_deploy_and_rollback_through_the_bastion(stack, bastion, releases, through_bastion):
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    hosts = through_bastion
    before = {h.name: forwarded(bastion, h.port) for h in hosts}
    state = deploy_pipeline(
        DeployRequest(
            service="web",
            version="11.0.0",
            allow_first_install=True,
            bake_seconds=0,
            requested_by="dave",
        ),
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert {h.name: current_of(h.root) for h in hosts} == {h.name: "11.0.0" for h in hosts}
    # Logged in as the deploy user, which owns what it deployed; the restart ran as root, which
    # the deploy user can only have done through sudo.
    assert stack.deploy_user == "kmpdeploy"
    for h in hosts:
        web = Path(h.root) / "srv" / "web"
        assert {owner(web / "current"), owner(web / "releases" / "11.0.0" / "app.py")} == {
            "kmpdeploy"
        }
        assert service_uid(h.root) == 0
        assert (
            "Accepted publickey for kmpdeploy from 127.0.0.1"
            in (Path(h.root) / "log" / "sshd.log").read_text()
        )
    middle = forwarded_beyond(bastion, hosts, before)
    assert all(middle[name] > before[name] for name in middle), (before, middle)
    # A release that fails its health check: rolled back, through the bastion as well.
    state = deploy_pipeline(
        DeployRequest(service="web", version="11.1.0", bake_seconds=0, requested_by="dave"),
        return_state=True,
    )
    assert state.is_failed()
    assert {h.name: current_of(h.root) for h in hosts} == {h.name: "11.0.0" for h in hosts}
    # the rollback restarted 11.0.0 through sudo again: a new root process serves it
    assert {service_uid(h.root) for h in hosts} == {0}
    after = {h.name: forwarded(bastion, h.port) for h in hosts}
    assert any(after[name] > middle[name] for name in after), (middle, after)
    # The bastion saw the certificate, never the plain key.
    log = bastion["info"].log_file.read_text()
    assert "ED25519-CERT" in log and "kmpops-deploy" in log


def test_a_command_no_sudo_rule_allows_stops_the_rollout_naming_it(
    stack, bastion, releases, through_bastion
):
    """The restart is changed to a command the installed rules do not name: sudo -n refuses it
    while the release is staged, before any host is switched, and the failure names the
    command and the host (sudo never waits for a password: no terminal, -n)."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    hosts = through_bastion
    path = Path(os.environ["KMPOPS_CONFIG"])
    data = yaml.safe_load(path.read_text())
    data["services"]["web"]["restart"] = "/usr/bin/true restart --port {web_port}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = {h.name: current_of(h.root) for h in hosts}
    state = deploy_pipeline(
        DeployRequest(
            service="web",
            version="11.2.0",
            allow_first_install=True,
            bake_seconds=0,
            requested_by="dave",
        ),
        return_state=True,
    )
    assert state.is_failed()
    message = state.message or ""
    assert "rollout stopped while staging batch 1/" in message and "none of it switched" in message
    # one reason for every host, then the hosts (group_failures folds names and numbers)
    assert "PrivilegeRefused: host <host>: sudo -n refused to run '/usr/bin/true restart" in message
    assert "as root (sudo -n -l lists no rule for it)" in message
    assert message.endswith(": " + ", ".join(h.name for h in hosts[: len(hosts) // 2]))
    assert {h.name: current_of(h.root) for h in hosts} == before
