"""Connections as production needs them, on real OpenSSH daemons: a bastion that only forwards,
hosts that accept only CA-signed user keys and present CA-signed host keys, encrypted keys,
an ssh-agent, and an Ansible inventory as the source of hosts."""

from __future__ import annotations

import gzip
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from kmpops import release as rel
from kmpops.config import parse_config
from kmpops.connectors.ssh import Endpoint, Fleet, SSHConnection
from kmpops.errors import AuthenticationFailed, ConnectorError, HostKeyRejected
from kmpops.stack.sshd import (
    SSHDOptions,
    new_key_pair,
    sign_key,
    start_fleet,
    stop_fleet,
)
from tests.conftest import PORT_BASE, STACK_ROOT

BASTION_PORT = PORT_BASE + 805
HOST_PORTS = [PORT_BASE + 806, PORT_BASE + 807]
PLAIN_PORT = PORT_BASE + 808
USER = pwd.getpwuid(os.getuid()).pw_name


class FleetFiles:
    """Paths of the module's fleet: CAs, keys, known_hosts files, daemons."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca"
        self.user_ca = self.ca / "user_ca"
        self.host_ca = self.ca / "host_ca"
        self.stranger_ca = self.ca / "stranger_ca"
        self.client_key = root / "keys" / "id_ed25519"
        self.known_hosts = root / "known_hosts_ca"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> FleetFiles:
    root = tmp_path_factory.mktemp("ssh-fleet")
    files = FleetFiles(root)
    for ca in (files.user_ca, files.host_ca, files.stranger_ca):
        new_key_pair(ca, ca.name)
    plain_root = root / "plain"
    try:
        # The bastion forwards and logs each forwarded connection; the hosts trust only
        # certificates (no plain key in authorized_keys) and present CA-signed host keys.
        bastion = start_fleet(
            root,
            ["bastion"],
            [BASTION_PORT],
            options=SSHDOptions(
                allow_tcp_forwarding=True,
                log_level="DEBUG1",
                trusted_user_ca=files.user_ca.with_suffix(".pub"),
                authorize_client_key=False,
            ),
        )[0]
        hosts = start_fleet(
            root,
            ["fl-1", "fl-2"],
            HOST_PORTS,
            options=SSHDOptions(
                trusted_user_ca=files.user_ca.with_suffix(".pub"),
                host_ca_key=files.host_ca,
                authorize_client_key=False,
            ),
        )
        plain = start_fleet(plain_root, ["plain-1"], [PLAIN_PORT])[0]
        sign_key(
            files.user_ca,
            files.client_key.with_name("id_ed25519.pub"),
            identity="kmpops-deployer",
            principals=[USER],
        )
        # known_hosts: the bastion pinned by its key, the hosts vouched for by the host CA only.
        host_ca_public = files.host_ca.with_suffix(".pub").read_text().split()[:2]
        bastion_public = (bastion.root / "etc" / "ssh_host_ed25519_key.pub").read_text()
        files.known_hosts.write_text(
            f"[127.0.0.1]:{BASTION_PORT} {' '.join(bastion_public.split()[:2])}\n"
            f"@cert-authority [127.0.0.1]:* {' '.join(host_ca_public)}\n"
        )
        files.bastion, files.hosts, files.plain = bastion, hosts, plain  # type: ignore[attr-defined]
        yield files
    finally:
        stop_fleet(root)
        stop_fleet(plain_root)


def bastion_hop(files: FleetFiles) -> Endpoint:
    return Endpoint(
        name="bastion",
        address="127.0.0.1",
        port=BASTION_PORT,
        user=USER,
        known_hosts=files.known_hosts,
        key_file=files.client_key,
    )


def through_bastion(files: FleetFiles, index: int, **overrides) -> SSHConnection:
    options = {
        "name": f"fl-{index + 1}",
        "address": "127.0.0.1",
        "port": HOST_PORTS[index],
        "user": USER,
        "key_file": files.client_key,
        "known_hosts": files.known_hosts,
        "jump": [bastion_hop(files)],
        **overrides,
    }
    return SSHConnection(**options)


def forwarded_to(files: FleetFiles, port: int) -> int:
    """How many forwarded connections to ``port`` the bastion's log shows."""
    log = (files.bastion.root / "log" / "sshd.log").read_text(errors="replace")
    return log.count(f"target 127.0.0.1 port {port}")


def tarball(tmp_path: Path, version: str) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in [("VERSION", f"{version}\n".encode()), ("app.txt", b"hello\n")]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"{version}.tar.gz"
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def deploy(conn: SSHConnection, artifact: Path, version: str, deploy_path: str) -> None:
    """Stage and activate a release the way deploy-pipeline does on each host."""
    rel.stage_release(conn, deploy_path, version, artifact, rel.file_sha256(artifact))
    rel.activate(conn, deploy_path, version, restart="true", restart_timeout=30)


def test_release_through_bastion_with_certificate(fleet, tmp_path):
    artifact = tarball(tmp_path, "1.4.0")
    before = [forwarded_to(fleet, port) for port in HOST_PORTS]
    for index, host in enumerate(fleet.hosts):
        deploy_path = f"{host.root}/srv/app"
        with through_bastion(fleet, index) as conn:
            deploy(conn, artifact, "1.4.0", deploy_path)
        # What the host holds: current points at the release, with its files.
        assert (Path(deploy_path) / "current" / "VERSION").read_text() == "1.4.0\n"
        assert os.readlink(Path(deploy_path) / "current").endswith("releases/1.4.0")
    after = [forwarded_to(fleet, port) for port in HOST_PORTS]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    # The host logged the certificate it accepted (not a plain key).
    host_log = (fleet.hosts[0].root / "log" / "sshd.log").read_text()
    assert "ED25519-CERT" in host_log and "kmpops-deployer" in host_log


def test_plain_key_is_refused_where_only_certificates_are_trusted(fleet, tmp_path):
    # The same key without its certificate: the host has no authorized_keys entry for it.
    bare = tmp_path / "id_ed25519"
    bare.write_bytes(fleet.client_key.read_bytes())
    bare.chmod(0o600)
    with pytest.raises(AuthenticationFailed) as err:
        through_bastion(fleet, 0, key_file=bare).run("true")
    assert f"host fl-1 (127.0.0.1:{HOST_PORTS[0]})" in str(err.value)


def test_host_certificate_from_unknown_ca_is_refused(fleet, tmp_path):
    stranger = fleet.stranger_ca.with_suffix(".pub").read_text().split()[:2]
    bastion_line = fleet.known_hosts.read_text().splitlines()[0]
    known = tmp_path / "known_hosts"
    known.write_text(f"{bastion_line}\n@cert-authority [127.0.0.1]:* {' '.join(stranger)}\n")
    marker = tmp_path / "touched"
    with pytest.raises(HostKeyRejected) as err:
        through_bastion(fleet, 0, known_hosts=known, jump=[]).run(["touch", str(marker)])
    message = str(err.value)
    assert f"host fl-1 (127.0.0.1:{HOST_PORTS[0]})" in message
    assert "not a @cert-authority for this host" in message
    assert not marker.exists()
    # Through the bastion the same: the hop is fine, the host behind it is refused.
    with pytest.raises(HostKeyRejected, match=r"fl-1.*not a @cert-authority"):
        SSHConnection(
            name="fl-1",
            address="127.0.0.1",
            port=HOST_PORTS[0],
            user=USER,
            key_file=fleet.client_key,
            known_hosts=known,
            jump=[
                Endpoint(
                    "bastion", "127.0.0.1", BASTION_PORT, USER, known, key_file=fleet.client_key
                )
            ],
        ).run("true")


@pytest.mark.parametrize("revoked", ["host key", "CA"])
def test_revoked_keys_are_refused(fleet, tmp_path, revoked):
    if revoked == "host key":
        key = (fleet.hosts[0].root / "etc" / "ssh_host_ed25519_key.pub").read_text()
    else:
        key = fleet.host_ca.with_suffix(".pub").read_text()
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts.read_text() + f"@revoked * {' '.join(key.split()[:2])}\n")
    with pytest.raises(HostKeyRejected) as err:
        through_bastion(fleet, 0, known_hosts=known, jump=[]).run("true")
    assert "fl-1" in str(err.value) and "@revoked" in str(err.value)


def test_unknown_bastion_key_is_refused(fleet, tmp_path):
    # Only the hosts' CA is known: the bastion's own key is not, so the first hop is refused.
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts.read_text().splitlines()[1] + "\n")
    hop = Endpoint("bastion", "127.0.0.1", BASTION_PORT, USER, known, key_file=fleet.client_key)
    with pytest.raises(HostKeyRejected) as err:
        through_bastion(fleet, 0, known_hosts=known, jump=[hop]).run("true")
    assert f"host bastion (127.0.0.1:{BASTION_PORT}): host key not in {known}" in str(err.value)


def test_encrypted_key_with_passphrase_from_env(fleet, tmp_path, monkeypatch):
    key = tmp_path / "deploy_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "correct horse", "-f", str(key)],
        check=True,
        timeout=30,
    )
    sign_key(fleet.user_ca, key.with_suffix(".pub"), identity="encrypted", principals=[USER])
    monkeypatch.setenv("KMPOPS_TEST_KEY_PASSPHRASE", "correct horse")
    with through_bastion(
        fleet, 1, key_file=key, key_passphrase="env:KMPOPS_TEST_KEY_PASSPHRASE"
    ) as c:
        assert c.run(["printenv", "KMPOPS_HOST"], check=True).stdout == "fl-2\n"
    monkeypatch.setenv("KMPOPS_TEST_KEY_PASSPHRASE", "wrong battery")
    with pytest.raises(ConnectorError) as err:
        through_bastion(
            fleet, 1, key_file=key, key_passphrase="env:KMPOPS_TEST_KEY_PASSPHRASE"
        ).run("true")
    message = str(err.value)
    assert f"SSH key file {key} could not be decrypted" in message
    assert "env:KMPOPS_TEST_KEY_PASSPHRASE" in message and "wrong battery" not in message
    # No passphrase at all: the error says how to give one.
    with pytest.raises(ConnectorError, match="is encrypted"):
        through_bastion(fleet, 1, key_file=key).run("true")


def test_agent_key(fleet, tmp_path):
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "ssh-agent did not create its socket"
            time.sleep(0.05)
        plain = fleet.plain
        subprocess.run(
            ["ssh-add", "-q", str(plain.key_file)],
            env={**os.environ, "SSH_AUTH_SOCK": str(socket_path)},
            check=True,
            timeout=30,
            capture_output=True,
        )
        conn = SSHConnection(
            name="plain-1",
            address="127.0.0.1",
            port=PLAIN_PORT,
            user=USER,
            key_file=None,
            known_hosts=plain.known_hosts,
            agent=True,
            agent_socket=socket_path,
        )
        with conn:
            assert conn.run(["printenv", "KMPOPS_HOST"], check=True).stdout == "plain-1\n"
        # An agent without the right key: refused, naming what was offered.
        empty = tmp_path / "empty.sock"
        other = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(empty)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not empty.exists():
                assert time.monotonic() < deadline + 10
                time.sleep(0.05)
            with pytest.raises(AuthenticationFailed, match=r"plain-1.*no key to offer"):
                SSHConnection(
                    name="plain-1",
                    address="127.0.0.1",
                    port=PLAIN_PORT,
                    user=USER,
                    key_file=None,
                    known_hosts=plain.known_hosts,
                    agent=True,
                    agent_socket=empty,
                ).run("true")
        finally:
            other.terminate()
            other.wait(10)
    finally:
        agent.terminate()
        agent.wait(10)


def test_agent_certificate_through_bastion(fleet, tmp_path):
    # ssh-add loads the key and the certificate beside it; the hosts accept only the latter.
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "ssh-agent did not create its socket"
            time.sleep(0.05)
        subprocess.run(
            ["ssh-add", str(fleet.client_key)],
            env={**os.environ, "SSH_AUTH_SOCK": str(socket_path)},
            check=True,
            timeout=30,
            capture_output=True,
        )
        hop = Endpoint(
            "bastion",
            "127.0.0.1",
            BASTION_PORT,
            USER,
            fleet.known_hosts,
            agent=True,
            agent_socket=socket_path,
        )
        before = forwarded_to(fleet, HOST_PORTS[0])
        with through_bastion(
            fleet, 0, key_file=None, agent=True, agent_socket=socket_path, jump=[hop]
        ) as conn:
            assert conn.run(["printenv", "KMPOPS_HOST"], check=True).stdout == "fl-1\n"
        assert forwarded_to(fleet, HOST_PORTS[0]) == before + 1
    finally:
        agent.terminate()
        agent.wait(10)


INI = """\
# production fleet, reached through the bastion
[web]
fl-1 ansible_port={p1}
fl-2 ansible_port={p2} tier=edge

[web:vars]
ansible_ssh_common_args='-o ProxyJump={user}@127.0.0.1:{bastion}'

[production:children]
web

[production:vars]
ansible_host=127.0.0.1
ansible_user={user}
ansible_ssh_private_key_file={key}
ansible_become=true
ansible_python_interpreter=/usr/bin/python3
"""

YAML = """\
all:
  children:
    production:
      vars:
        ansible_host: 127.0.0.1
        ansible_user: {user}
        ansible_ssh_private_key_file: {key}
        ansible_become: true
      children:
        web:
          vars:
            ansible_ssh_common_args: "-J {user}@127.0.0.1:{bastion}"
          hosts:
            fl-1:
              ansible_port: {p1}
            fl-2:
              ansible_port: {p2}
              tier: edge
"""


@pytest.mark.parametrize("form", ["ini", "yaml"])
def test_ansible_inventory_drives_a_deploy(fleet, tmp_path, form):
    text = (INI if form == "ini" else YAML).format(
        p1=HOST_PORTS[0], p2=HOST_PORTS[1], user=USER, bastion=BASTION_PORT, key=fleet.client_key
    )
    inventory = tmp_path / f"hosts.{form}"
    inventory.write_text(text)
    ops = {
        "environments": {
            "production": {
                "inventory": {
                    "path": inventory.name,
                    "defaults": {"known_hosts": str(fleet.known_hosts)},
                }
            }
        }
    }
    (tmp_path / "ops.yaml").write_text(yaml.safe_dump(ops))
    cfg = parse_config(ops, source=str(tmp_path / "ops.yaml"))
    hosts = cfg.environments["production"].hosts
    assert [(h.name, h.port, h.user, len(h.jump)) for h in hosts] == [
        ("fl-1", HOST_PORTS[0], USER, 1),
        ("fl-2", HOST_PORTS[1], USER, 1),
    ]
    assert hosts[1].vars == {"tier": "edge"}
    artifact = tarball(tmp_path, f"2.0.{form}")
    version = f"2.0.{form}"
    before = forwarded_to(fleet, HOST_PORTS[1])
    with Fleet(hosts) as fl:
        outcomes = fl.run(
            lambda conn: deploy(
                conn, artifact, version, f"{fleet.root}/hosts/{conn.name}/srv/inventory-app"
            )
        )
    assert {name: o.error for name, o in outcomes.items()} == {"fl-1": None, "fl-2": None}
    for name in ("fl-1", "fl-2"):
        current = fleet.root / "hosts" / name / "srv" / "inventory-app" / "current" / "VERSION"
        assert current.read_text() == f"{version}\n"
    assert forwarded_to(fleet, HOST_PORTS[1]) > before


def test_inventory_import_command(fleet, tmp_path):
    inventory = tmp_path / "hosts"
    inventory.write_text(
        INI.format(
            p1=HOST_PORTS[0],
            p2=HOST_PORTS[1],
            user=USER,
            bastion=BASTION_PORT,
            key=fleet.client_key,
        )
    )
    done = subprocess.run(
        [
            str(Path(os.sys.executable).with_name("kmpops")),
            "inventory",
            "import",
            str(inventory),
            "--known-hosts",
            str(fleet.known_hosts),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = yaml.safe_load(done.stdout)
    cfg = parse_config(imported)
    assert [h.name for h in cfg.environments["production"].hosts] == ["fl-1", "fl-2"]
    # The report names what it mapped and what it could not, with the line.
    assert "production: 2 hosts from group production" in done.stderr
    assert f"not mapped {inventory}:17: ansible_python_interpreter (fl-1)" in done.stderr
    assert "become=True" in done.stderr.split("mapped fl-1:")[1].splitlines()[0]
    assert all(h.become for h in cfg.environments["production"].hosts)
    assert "mapped fl-2: " in done.stderr and "jump via 1 hop(s)" in done.stderr
    with SSHConnection.from_host(cfg.environments["production"].hosts[0]) as conn:
        assert conn.run(["printenv", "KMPOPS_HOST"], check=True).stdout == "fl-1\n"


def test_inventory_with_an_unsafe_value_is_refused(tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[production]\nfl-0\nfl-1 ansible_host='a;rm -rf /'\n")
    done = subprocess.run(
        [
            str(Path(os.sys.executable).with_name("kmpops")),
            "inventory",
            "import",
            str(inventory),
            "--known-hosts",
            str(tmp_path / "kh"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert f"{inventory}:3: 'a;rm -rf /' is not a host name or IP address" in done.stderr
    assert done.stdout == ""


def test_local_stack_with_a_bastion():
    from kmpops import stack
    from kmpops.config import load_config

    # In the repository, not under pytest's 0700 temporary directory: the stack's deploy user
    # must be able to enter the host roots (sshd reads its authorized_keys as that user).
    root = STACK_ROOT.with_name(f"{STACK_ROOT.name}-bastion")
    shutil.rmtree(root, ignore_errors=True)
    spec = stack.StackSpec(
        root=root,
        port_base=PORT_BASE + 809,  # hosts at +810, +811
        production_hosts=2,
        staging_hosts=0,
        components=("sshd",),
        bastion=True,
        bastion_port=PORT_BASE + 812,
    )
    try:
        info = stack.up(spec)
        cfg = load_config(info.ops_yaml)
        hosts = cfg.environments["production"].hosts
        assert [(h.name, h.jump[0].port) for h in hosts] == [
            ("prd-1", PORT_BASE + 812),
            ("prd-2", PORT_BASE + 812),
        ]
        with Fleet(hosts) as fl:
            outcomes = fl.run(
                lambda c: c.run("printenv KMPOPS_HOST; id -un", check=True).stdout.split()
            )
        assert {n: o.value for n, o in outcomes.items()} == {
            "prd-1": ["prd-1", "kmpdeploy"],
            "prd-2": ["prd-2", "kmpdeploy"],
        }
        log = Path(info.bastion["log"]).read_text()
        for port in (PORT_BASE + 810, PORT_BASE + 811):
            assert f"target 127.0.0.1 port {port}" in log
    finally:
        stack.down(root)
        shutil.rmtree(root, ignore_errors=True)


def test_inventory_host_without_a_key_is_named(tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[production]\nweb1 ansible_host=10.0.0.1\n\n[staging]\nstg1\n")
    done = subprocess.run(
        [str(Path(os.sys.executable).with_name("kmpops")), "inventory", "import", str(inventory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert f"give key_file, or agent: true (host web1, {inventory}:2)" in done.stderr
    assert "hint: --key-file PATH or --agent" in done.stderr


def test_own_key_fingerprints_cover_encrypted_agent_and_hop_keys(fleet, tmp_path):
    from kmpops.access import fingerprint_of_key_file
    from kmpops.config import Host, JumpHost
    from kmpops.connectors.ssh import own_key_fingerprints

    encrypted = tmp_path / "enc_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f", str(encrypted)],
        check=True,
        timeout=30,
    )
    public = encrypted.with_suffix(".pub").read_text().split()[:2]
    expected_encrypted = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(encrypted.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()[1]
    assert public[0] == "ssh-ed25519"
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        subprocess.run(
            ["ssh-add", "-q", str(fleet.plain.key_file)],
            env={**os.environ, "SSH_AUTH_SOCK": str(socket_path)},
            check=True,
            timeout=30,
            capture_output=True,
        )
        host = Host(
            name="h1",
            address="127.0.0.1",
            key_file=encrypted,  # no passphrase configured: read from enc_key.pub
            known_hosts=fleet.known_hosts,
            agent=True,
            agent_socket=socket_path,
            jump=[JumpHost(address="127.0.0.1", port=BASTION_PORT, key_file=fleet.client_key)],
        )
        assert own_key_fingerprints(host) == {
            expected_encrypted,
            fingerprint_of_key_file(fleet.plain.key_file),
            fingerprint_of_key_file(fleet.client_key),
        }
    finally:
        agent.terminate()
        agent.wait(10)
