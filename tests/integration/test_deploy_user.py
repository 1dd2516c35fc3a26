"""The local stack's non-root deploy user on real sshd and the real sudo: who logs in, what it
owns, the sudo rules installed for exactly the restart (visudo-checked), and what sudo -n does
with a command no rule names: an error naming the command, the host and the user, at once."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kmpops.become import Become, check_sudo, service_become_argvs
from kmpops.config import load_config
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import PrivilegeRefused
from tests.conftest import PORT_BASE, STACK_ROOT

pytestmark = pytest.mark.stack
KMPOPS = str(Path(os.sys.executable).with_name("kmpops"))


@pytest.fixture(scope="module")
def prd1(stack):
    cfg = load_config(stack.ops_yaml)
    _, host = cfg.host("prd-1")
    return cfg, host


def test_the_stack_logs_in_as_its_deploy_user_without_a_terminal(stack, prd1):
    _, host = prd1
    assert (host.user, host.become, host.become_user) == ("kmpdeploy", True, "root")
    with SSHConnection.from_host(host) as conn:
        assert conn.run(["id", "-un"], check=True).stdout == "kmpdeploy\n"
        tty = conn.run(["tty"])
        assert (tty.exit_status, tty.stdout) == (1, "not a tty\n")
        # it owns the deploy root, not the host's sshd files
        assert conn.run(["stat", "-c", "%U", f"{host.vars['root']}/srv"]).stdout == "kmpdeploy\n"
        denied = conn.run(["touch", f"{host.vars['root']}/etc/sshd_config"])
        assert denied.exit_status == 1 and "Permission denied" in denied.stderr


def test_the_installed_rules_are_root_only_and_valid(stack):
    rules = Path(stack.sudoers)
    info = rules.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o440)
    done = subprocess.run(
        ["visudo", "-cf", str(rules)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in rules.read_text().splitlines() if not line.startswith("#")]
    # one rule per host for the restart with its port (what ops.yaml renders), one without;
    # three for the package manager (apt-get update, install and downgrade of NAME=VERSION)
    restart = [line for line in lines if "/srv/web/current/control" in line]
    packages = [line for line in lines if "apt-get" in line]
    assert len(restart) == 2 * len(stack.hosts) and len(packages) == 3 * len(stack.hosts)
    assert len(restart) + len(packages) == len(lines)
    assert all(line.startswith("kmpdeploy ALL=(root) NOPASSWD: ") for line in lines)


def test_sudo_refuses_at_once_what_no_rule_names(stack, prd1):
    cfg, host = prd1
    with SSHConnection.from_host(host) as conn:
        assert conn.run(["id", "-u"], become=None).stdout != "0\n"
        with pytest.raises(PrivilegeRefused) as err:
            conn.run(["/usr/bin/id", "-u"], become=Become("root"), timeout=30)
        message = str(err.value)
        assert message.startswith("host prd-1: sudo -n refused to run '/usr/bin/id -u' as root")
        assert "a password is required" in message and "kmpops sudoers" in message
        # the restart is allowed as root, not as another user
        restart = service_become_argvs(cfg.service("web"), host)
        assert restart and restart[0][0].endswith("/srv/web/current/control")
        unchecked = check_sudo(conn, host, restart)
        assert unchecked in ([], [" ".join(restart[0])])  # [] once a release is current
        as_postgres = host.model_copy(update={"become_user": "postgres"})
        with pytest.raises(PrivilegeRefused) as err:
            check_sudo(conn, as_postgres, [["/usr/bin/true"]])
        assert "'/usr/bin/true' as postgres" in str(err.value)


def test_kmpops_sudoers_prints_the_rules_the_stack_installed(stack):
    done = subprocess.run(
        [KMPOPS, "sudoers", "production", "--config", stack.ops_yaml],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    installed = set(Path(stack.sudoers).read_text().splitlines())
    prd = [h for h in stack.hosts if h.environment == "production"]
    restart = [line for line in printed if "/srv/web/current/control" in line]
    assert len(restart) == len(prd) and set(printed) <= installed
    assert len([line for line in printed if "apt-get" in line]) == 3 * len(prd)
    for h in prd:
        assert f"# WARNING {h.name}: {h.root}/srv/web/current/control lies under" in done.stdout
    unknown = subprocess.run(
        [KMPOPS, "sudoers", "qa", "--config", stack.ops_yaml],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unknown.returncode == 1 and "unknown environment 'qa'" in unknown.stderr
    assert unknown.stdout == ""


def test_stack_up_again_keeps_the_user_and_down_removes_the_rules():
    from kmpops import stack

    root = STACK_ROOT.with_name(f"{STACK_ROOT.name}-deploy-user")
    shutil.rmtree(root, ignore_errors=True)
    spec = stack.StackSpec(
        root=root,
        port_base=PORT_BASE + 830,  # host at +831
        production_hosts=1,
        staging_hosts=0,
        components=("sshd",),
    )
    try:
        first = stack.up(spec)
        again = stack.up(spec)
        assert first.sudoers == again.sudoers and Path(again.sudoers).exists()
        assert Path(first.hosts[0].root, "srv").owner() == "kmpdeploy"
        stack.down(root)
        assert not Path(first.sudoers).exists()
        assert __import__("pwd").getpwnam("kmpdeploy")  # shared by every stack on the machine
    finally:
        stack.down(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_root_the_deploy_user_cannot_enter_gets_its_hosts_where_it_can(tmp_path):
    """A checkout under a mode-700 directory (root's home, pytest's tmp): the host roots move
    to /var/lib/kmpops/hosts-<digest>, ``hosts`` points there, no directory's mode changes, and
    the deploy user logs in and owns its deploy root; a fresh stack there starts empty."""
    from kmpops import stack

    root = tmp_path / "stack"  # below pytest's 0700 directory
    spec = stack.StackSpec(
        root=root,
        port_base=PORT_BASE + 832,
        production_hosts=1,
        staging_hosts=0,
        components=("sshd",),
    )
    modes = {d: stat.S_IMODE(d.stat().st_mode) for d in (tmp_path, tmp_path.parent)}
    try:
        info = stack.up(spec)
        target = (root / "hosts").resolve()
        assert (root / "hosts").is_symlink() and str(target).startswith("/var/lib/kmpops/hosts-")
        assert Path(info.hosts[0].root).parent == target
        assert {d: stat.S_IMODE(d.stat().st_mode) for d in modes} == modes
        _, host = load_config(info.ops_yaml).host("prd-1")
        with SSHConnection.from_host(host) as conn:
            assert conn.run(["id", "-un"], check=True).stdout == "kmpdeploy\n"
        assert Path(info.hosts[0].root, "srv").owner() == "kmpdeploy"
        (target / "prd-1" / "leftover").write_text("x")
        stack.down(root)
        shutil.rmtree(root)  # the checkout's var/ removed: the next stack starts empty
        stack.up(spec)
        assert not (target / "prd-1" / "leftover").exists()
    finally:
        stack.down(root)
        shutil.rmtree((root / "hosts").resolve(), ignore_errors=True)


def test_a_restart_refused_after_the_switch_names_the_command(stack, prd1, tmp_path):
    """A first install cannot be asked about beforehand (``current/control`` does not exist
    until the switch): the refusal then comes from the restart itself, and names it."""
    from kmpops import release as rel
    from kmpops import shellsafe
    from kmpops.become import sudo_argv
    from kmpops.errors import CommandFailed
    from kmpops.stack.sample_service import build_release

    _, host = prd1
    path = f"{host.vars['root']}/srv/become-probe"
    tarball = build_release("1.0.0", tmp_path)
    words = [f"{path}/current/control", "restart", "--port", "1"]
    restart = shellsafe.join(sudo_argv(words, Become()))
    expected = f"sudo -n refused to run '{' '.join(words)}' as root (sudo: a password is required)"
    with SSHConnection.from_host(host) as conn:
        try:
            rel.stage_release(conn, path, "1.0.0", tarball, rel.file_sha256(tarball))
            assert check_sudo(conn, host, [words]) == [" ".join(words)]  # not checkable yet
            with pytest.raises(rel.RestartFailed) as err:
                rel.activate(conn, path, "1.0.0", restart=restart)
            assert err.value.previous is None
            assert expected in str(err.value) and "host prd-1" in str(err.value)
            with pytest.raises(CommandFailed) as err:
                rel.restart_service(conn, restart)
            assert expected in str(err.value)
        finally:
            conn.run(["rm", "-rf", path], timeout=30)
