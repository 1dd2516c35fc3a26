"""Issue #10, bounded authority: a parameter, a record or a template can never widen what a run
touches. Each test reproduces one finding against the real stack (sshd hosts, SeaweedFS,
PostgreSQL, the Prefect server) and asserts what a user would notice: a refused request with
its message, a host file unchanged, a backup still there, a login that still works.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmpops.access import new_ed25519_keypair
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import AuthenticationFailed, ConfigError, UnsafeValueError
from tests.conftest import PORT_BASE, REPO
from tests.flows.ops_variant import ops_yaml_variant

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

BOB = new_ed25519_keypair("bob@laptop")[1]
SHORT_BLOB = base64.b64encode(base64.b64decode(BOB.key_b64)[:-5]).decode()


@pytest.fixture(autouse=True)
def _stack_up(stack: Any) -> None:
    """Every test here runs against the session stack (and its Prefect server)."""


@pytest.fixture
def variant(monkeypatch: pytest.MonkeyPatch, stack: Any, tmp_path: Path):
    return ops_yaml_variant(stack, tmp_path, monkeypatch)


def staging(stack: Any) -> list[Any]:
    return [h for h in stack.hosts if h.environment == "staging"]


def etc_tree(host: Any) -> dict[str, bytes]:
    etc = Path(host.root) / "etc"
    return {str(p.relative_to(etc)): p.read_bytes() for p in sorted(etc.rglob("*")) if p.is_file()}


@pytest.fixture
def keep_etc(stack: Any):
    """Snapshot every stack host's etc/ tree; the test asserts on it, teardown puts it back."""
    saved = {h.name: etc_tree(h) for h in stack.hosts}
    yield saved
    for h in stack.hosts:
        etc = Path(h.root) / "etc"
        for rel in set(etc_tree(h)) - set(saved[h.name]):
            (etc / rel).unlink()
        for rel, data in saved[h.name].items():
            (etc / rel).write_bytes(data)


def flow_error(call: Any) -> str:
    """Run ``call``; return the text of the error it raised (the test fails if it raised none)."""
    with pytest.raises(Exception) as err:
        call()
    return str(err.value)


# -- 1. provision-access: no path parameter, no key options unless allow-listed ------------------


def _stop_web(host) -> None:
    """Stop the sample service on ``host`` if an earlier test of the session left it running:
    troubleshoot then finds it down, and the crash finding carries the log's crash line."""
    control = Path(host.root) / "srv" / "web" / "current" / "control"
    if control.exists():
        subprocess.run([str(control), "stop"], check=False, timeout=30, capture_output=True)


def test_provision_access_payload_is_refused_and_no_host_file_changes(stack, keep_etc) -> None:
    from flows.provision_access import provision_access

    for h in staging(stack):
        (Path(h.root) / "etc" / "profile.d").mkdir(exist_ok=True)
    payload = {
        "user": "bob",
        "public_key": f"$(id>/tmp/pwned) {BOB.public_line()}",
        "environment": "staging",
        "authorized_keys_path": "{root}/etc/profile.d/kmp.sh",
    }
    message = flow_error(lambda: provision_access(change=payload))
    assert "authorized_keys_path" in message
    assert "ops.yaml" in message
    for h in stack.hosts:
        assert etc_tree(h) == keep_etc[h.name]
        assert not (Path(h.root) / "etc" / "profile.d" / "kmp.sh").exists()

    # the key alone (default location) is refused too: its options field is not an option
    payload.pop("authorized_keys_path")
    message = flow_error(lambda: provision_access(change=payload))
    assert "public_key" in message and "option" in message
    for h in stack.hosts:
        assert etc_tree(h) == keep_etc[h.name]


def test_key_options_need_the_config_allow_list(stack, keep_etc, variant) -> None:
    from flows.provision_access import provision_access

    line = f'command="id" {BOB.public_line()}'
    change = {"user": "bob", "public_key": line, "environment": "staging"}
    message = flow_error(lambda: provision_access(change=change))
    assert 'command="id"' in message and "access.key_options" in message
    for h in stack.hosts:
        assert etc_tree(h) == keep_etc[h.name]

    def allow(data: dict) -> None:
        data["access"] = {"key_options": ["no-port-forwarding", "no-agent-forwarding"]}

    variant(allow)
    allowed = f"no-port-forwarding,no-agent-forwarding {BOB.public_line()}"
    result = provision_access(
        change={"user": "bob", "public_key": allowed, "environment": "staging"}
    )
    assert sorted(result["changed"]) == sorted(h.name for h in staging(stack))
    for h in staging(stack):
        keys = (Path(h.root) / "etc" / "authorized_keys").read_text()
        assert allowed in keys.splitlines()
    # a listed option next to one that is not: the whole key is refused
    mixed = f'no-port-forwarding,command="id" {BOB.public_line()}'
    message = flow_error(
        lambda: provision_access(
            change={"user": "bob", "public_key": mixed, "environment": "staging"}
        )
    )
    assert 'command="id"' in message


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (f"{BOB.key_type} {BOB.key_b64} bob$(id)", "comment"),
        (f"{BOB.key_type} {BOB.key_b64} bob\nssh-ed25519 AAAA", "newline"),
        (f"ssh-rsa {BOB.key_b64} bob", "does not match"),
        (f"{BOB.key_type} {SHORT_BLOB} bob", "not a valid"),
    ],
)
def test_malformed_public_keys_are_refused(stack, keep_etc, line, why) -> None:
    from flows.provision_access import provision_access

    change = {"user": "bob", "public_key": line, "environment": "staging"}
    message = flow_error(lambda: provision_access(change=change))
    assert "public_key" in message and why in message
    for h in stack.hosts:
        assert etc_tree(h) == keep_etc[h.name]


def test_approval_shows_the_path_and_the_exact_line(stack, keep_etc) -> None:
    from flows.provision_access import provision_access
    from kmpops.errors import PolicyViolation
    from kmpops.stack import approver_token
    from tasks.common import records
    from tests.flows.test_access import answer_approval

    carol = new_ed25519_keypair("carol@laptop")[1]
    earlier = {a.id for a in records().approvals()}  # the session's other tests ask too
    answering = answer_approval(
        "access add carol",
        {
            "decision": "reject",
            "approver": "alice",
            "reason": "not today",
            "approver_token": approver_token(Path(stack.root), "alice"),
        },
    )
    with pytest.raises(PolicyViolation):
        provision_access(
            change={
                "user": "carol",
                "public_key": carol.public_line(),
                "environment": "production",
                "requested_by": "dave",
            }
        )
    answering.join(10)
    assert not answering.errors  # type: ignore[attr-defined]
    [seen] = [
        a
        for a in records().approvals()
        if a.id not in earlier
        and a.subject.startswith("access add carol")
        and a.details.get("kind") == "request"
    ]
    for h in stack.hosts:
        if h.environment == "production":
            assert f"{h.root}/etc/authorized_keys" in seen.summary
    assert carol.public_line() in seen.summary
    for h in stack.hosts:
        assert etc_tree(h) == keep_etc[h.name]


def test_rotation_and_review_take_no_path_parameter(stack) -> None:
    from flows.access_review import access_review
    from flows.rotate_service_keys import rotate_service_keys

    where = "{root}/etc/profile.d/kmp.sh"
    message = flow_error(lambda: rotate_service_keys(request={"authorized_keys_path": where}))
    assert "authorized_keys_path" in message
    message = flow_error(lambda: access_review(request={"authorized_keys_path": where}))
    assert "authorized_keys_path" in message


# -- 2. troubleshoot: log locations come from config -----------------------------------------


def test_troubleshoot_reads_only_configured_logs(stack, variant) -> None:
    from flows.troubleshoot import troubleshoot

    host = staging(stack)[0]
    _stop_web(host)
    private = Path(host.root) / "etc" / "kmpops-private.txt"
    private.write_text("Traceback (most recent call last):\nMemoryError private-content-7f3a\n")
    try:
        request = {
            "hosts": [host.name],
            "service": "web",
            "log_template": "{root}/etc/kmpops-private.txt",
        }
        message = flow_error(lambda: troubleshoot(request=request))
        assert "log_template" in message and "ops.yaml" in message

        message = flow_error(
            lambda: troubleshoot(request={"hosts": [host.name], "service": "web", "log": "nope"})
        )
        assert "nope" in message and "logs" in message

        def logs(data: dict) -> None:
            data["services"]["web"]["logs"] = {"private": "{root}/etc/kmpops-private.txt"}

        variant(logs)
        result = troubleshoot(request={"hosts": [host.name], "service": "web", "log": "private"})
        crash = [f for f in result["findings"] if f["issue"] == "crash"]
        assert crash and "MemoryError" in crash[0]["evidence"]
    finally:
        private.unlink()


# -- 3. backup-retention: as_of may only look back -------------------------------------------


@pytest.fixture
def bk(stack, tmp_path, monkeypatch):
    from tests.flows.backup_fixtures import drop_env, make_env, seed_database

    env = make_env(stack, tmp_path)
    seed_database(env)
    monkeypatch.setenv("KMPOPS_CONFIG", str(env.ops_yaml))
    yield env
    drop_env(env)


def test_retention_as_of_in_the_future_is_refused_and_deletes_nothing(bk) -> None:
    from flows.backup_database import backup_database
    from flows.backup_retention import backup_retention
    from flows.verify_backups import verify_backups

    first = backup_database(["shop"])[0]
    second = backup_database(["shop"])[0]
    verify_backups(databases=["shop"], hosts=[])
    objects = bk.keys("database/")
    later = datetime.now(UTC) + timedelta(days=60)
    message = flow_error(lambda: backup_retention(as_of=later))
    assert "as_of" in message and "future" in message
    rec = bk.records()
    for made in (first, second):
        assert rec.backup(made["record_id"]).state == "complete"
    assert bk.keys("database/") == objects
    # looking back is narrowing: allowed, and nothing is old enough then
    done = backup_retention(as_of=datetime.now(UTC) - timedelta(days=1))
    assert done["delete"] == [] and bk.keys("database/") == objects


# -- 4. render_command: a placeholder inside quotes can never break out ------------------------


def test_quoted_placeholder_cannot_run_a_command(stack) -> None:
    from kmpops.shellsafe import render_command

    host = staging(stack)[0]
    marker = Path(host.root) / "pwned-by-id"
    marker.unlink(missing_ok=True)
    value = f"a; id > {marker}"
    with SSHConnection.from_host(_host_cfg(host)) as conn:
        for template in ("sh -c 'echo {x}'", 'sh -c "echo {x}"', "echo \\{x}"):
            with pytest.raises(UnsafeValueError, match=r"\{x\}.*quot"):
                conn.run(render_command(template, {"x": value}), timeout=30)
        assert not marker.exists()
        # the way to hand a value to an inner shell: as an argument, never as code
        safe = render_command("sh -c 'echo \"$1\"' sh {x}", {"x": value})
        assert conn.run(safe, timeout=30).stdout == value + "\n"
    assert not marker.exists()


def test_quoted_placeholder_in_config_is_refused_at_load(stack, variant) -> None:
    from kmpops.config import load_config

    def quoted(data: dict) -> None:
        data["services"]["web"]["drain"] = "sh -c 'echo {address} >> /tmp/drained'"

    with pytest.raises(ConfigError, match=r"services\.web\.drain: .*\{address\}.*quot"):
        load_config(variant(quoted))


def _host_cfg(host: Any) -> Any:
    from tasks.common import ops_config

    return ops_config().host(host.name)[1]


# -- 5. host var root: a safe absolute path, checked at config load ---------------------------


@pytest.mark.parametrize("root", ["-delete", "srv/relative", "/srv/../etc", "/srv/$(id)"])
def test_host_root_var_must_be_a_safe_absolute_path(stack, variant, root) -> None:
    from kmpops.config import load_config

    def bad_root(data: dict) -> None:
        data["environments"]["staging"]["hosts"][0]["vars"]["root"] = root

    with pytest.raises(ConfigError, match=r"environments\.staging\.hosts\[0\]\.vars: .*root"):
        load_config(variant(bad_root))


# -- 6. secret files are created with mode 0600, never widened first --------------------------

_WRITE_SECRETS = """
import sys
from pathlib import Path
from kmpops.access import new_ed25519_keypair, write_private_key
from kmpops.stack import _write_approver_tokens
from kmpops.stack.sshd import _new_ed25519

out = Path(sys.argv[1])
_write_approver_tokens(out)
private, public = new_ed25519_keypair("t")
write_private_key(out / "id_rotated", private, public)
_new_ed25519(out / "host_key", "h")
"""


def test_secret_files_are_created_0600(tmp_path: Path) -> None:
    out = tmp_path / "secrets-out"
    out.mkdir()
    trace = tmp_path / "open.trace"
    subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,creat",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            _WRITE_SECRETS,
            str(out),
        ],
        check=True,
        cwd=REPO,
        timeout=120,
    )
    created = [
        line
        for line in trace.read_text().splitlines()
        if str(out) in line and "O_CREAT" in line and ".pub" not in line
    ]
    assert len(created) >= 6, created  # 3 tokens, the book, 2 private keys
    wide = [line for line in created if not re.search(r", 0?600\)", line)]
    assert not wide, wide
    for path in out.rglob("*"):
        if path.is_file() and not path.name.endswith(".pub"):
            assert path.stat().st_mode & 0o777 == 0o600, path


# -- 7. key rotation: kmp-ops can log in at every point ---------------------------------------

_ROTATE_THEN_DIE = """
import os, signal, sys
import tasks.access as steps
from kmpops.access import parse_authorized_keys

old_fp = sys.argv[1]
real_write = steps.write_authorized_keys

def write_then_die(conn, path, text):
    real_write(conn, path, text)
    if old_fp not in {k.fingerprint for k in parse_authorized_keys(text)}:
        os.kill(os.getpid(), signal.SIGKILL)  # killed as the first old-key removal lands

steps.write_authorized_keys = write_then_die
from flows.rotate_service_keys import rotate_service_keys
rotate_service_keys()
"""


@pytest.fixture
def rotation_fleet(stack, tmp_path):
    from kmpops.stack import sshd

    root = tmp_path / "fleet"
    infos = sshd.start_fleet(root, ["auth-1", "auth-2"], [PORT_BASE + 700, PORT_BASE + 701])
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
    path = tmp_path / "rotation-ops.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    yield infos, path
    sshd.stop_fleet(root)


def login(info: Any, key_file: Path) -> bool:
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


def test_rotation_killed_at_old_key_removal_keeps_kmpops_logged_in(rotation_fleet) -> None:
    from kmpops.access import fingerprint_of_key_file, parse_authorized_keys

    infos, ops_yaml = rotation_fleet
    key_file = infos[0].key_file
    old_fp = fingerprint_of_key_file(key_file)
    env = {**os.environ, "KMPOPS_CONFIG": str(ops_yaml)}
    proc = subprocess.run(
        [sys.executable, "-c", _ROTATE_THEN_DIE, old_fp],
        cwd=REPO,
        env=env,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    removed = [
        i.name
        for i in infos
        if old_fp
        not in {
            k.fingerprint
            for k in parse_authorized_keys((i.root / "etc" / "authorized_keys").read_text())
        }
    ]
    assert removed  # the kill came after the old key left a host
    for info in infos:
        assert login(info, key_file), f"kmp-ops locked out of {info.name}"
    # a second run finishes the job: only the newest key is left, and it is in the key file
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from flows.rotate_service_keys import rotate_service_keys; rotate_service_keys()",
        ],
        cwd=REPO,
        env=env,
        timeout=240,
        check=True,
        capture_output=True,
    )
    now_fp = fingerprint_of_key_file(key_file)
    for info in infos:
        keys = parse_authorized_keys((info.root / "etc" / "authorized_keys").read_text())
        assert [k.fingerprint for k in keys] == [now_fp]
        assert login(info, key_file)


# -- 8. artifacts are redacted ----------------------------------------------------------------


def _artifacts_of(flow_run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert found
    return "\n".join(f"{a.description}\n{a.data}" for a in found)


def test_artifacts_never_carry_a_secret(stack) -> None:
    from flows.provision_access import provision_access
    from flows.troubleshoot import troubleshoot

    s3_secret = (Path(stack.root) / "secrets" / "s3_secret_key").read_text().strip()
    typed = "hunter2-kmpops-typed"
    reason = f"ticket 42: old creds were password={typed} and {s3_secret}"
    state = provision_access(
        change={
            "user": "bob",
            "public_key": BOB.public_line(),
            "environment": "staging",
            "dry_run": True,
            "reason": reason,
        },
        return_state=True,
    )
    text = _artifacts_of(state.state_details.flow_run_id)
    assert "ticket 42" in text
    assert typed not in text and s3_secret not in text

    host = staging(stack)[0]
    _stop_web(host)
    log = Path(host.root) / "srv" / "web" / "shared" / "log" / "web.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = log.read_bytes() if log.exists() else None
    log.write_text(
        "Traceback (most recent call last):\n"
        f"MemoryError connecting to s3://kmp:{s3_secret}@127.0.0.1 token={typed}\n"
    )
    try:
        state = troubleshoot(
            request={"hosts": [host.name], "service": "web", "symptom": f"api key {s3_secret}"},
            return_state=True,
        )
    finally:
        if saved is None:
            log.unlink()
        else:
            log.write_bytes(saved)
    text = _artifacts_of(state.state_details.flow_run_id)
    assert "MemoryError" in text
    assert typed not in text and s3_secret not in text


def test_every_artifact_goes_through_the_redacting_helpers() -> None:
    """Flows and tasks create artifacts only through tasks/artifacts.py (which redacts)."""
    direct = [
        str(path.relative_to(REPO))
        for folder in ("flows", "tasks", "deployments")
        for path in sorted((REPO / folder).rglob("*.py"))
        if "prefect.artifacts" in path.read_text() and path != REPO / "tasks" / "artifacts.py"
    ]
    assert direct == []


# -- 9. restore-configuration keeps mode and owner, never world-readable -------------------------


def test_restored_config_file_keeps_mode_and_owner(bk, stack, tmp_path) -> None:
    from flows.backup_configuration import backup_configuration
    from flows.restore_configuration import restore_configuration

    host = "stg-1"
    conf = bk.config_dirs[host]
    conf.mkdir(parents=True)
    secret_conf = conf / "db.conf"
    secret_conf.write_text("password = kept-private\n")
    os.chown(secret_conf, 65534, 65534)
    secret_conf.chmod(0o640)
    [taken] = backup_configuration(hosts=[host])
    secret_conf.write_text("password = changed\n")
    os.chown(secret_conf, 0, 0)
    secret_conf.chmod(0o644)

    [stg] = [h for h in stack.hosts if h.name == host]
    sshd_pid = int((Path(stg.root) / "run" / "sshd.pid").read_text())
    trace = tmp_path / "sshd.trace"
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=openat,open,creat",
            "-o",
            str(trace),
            "-p",
            str(sshd_pid),
        ]
    )
    try:
        time.sleep(1)  # strace attaches before the restore connects
        restore_configuration(host, backup_id=taken["record_id"], safety_backup=False)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    assert secret_conf.read_text() == "password = kept-private\n"
    st = secret_conf.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 65534, 65534)
    # the first open that creates each file under the config dir: never wider than 0600
    first: dict[str, str] = {}
    for line in trace.read_text().splitlines():
        found = re.search(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", (\S+), (0\d+)\)', line)
        if found and str(conf) in found[1] and "O_CREAT" in found[2]:
            first.setdefault(found[1], line)
    assert first
    wide = [line for line in first.values() if not re.search(r", 0?[0-7]00\)", line)]
    assert not wide, wide
