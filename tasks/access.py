"""Access steps: read and replace a host's authorized_keys, log in with a given key.

Each step is one host. ``replace_authorized_keys`` writes atomically and reads back what it
wrote; the caller keeps the previous text to compensate. Where a host's authorized_keys is
comes from ops.yaml only (:func:`configured_keys_path`): no step takes a path. Key material
handled here is public (authorized_keys); a private key only appears as a file path (mode
0600), never as a value.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from kmpops.access import (
    authorized_keys_path,
    parse_authorized_keys,
    read_authorized_keys,
    write_authorized_keys,
)
from kmpops.config import Host, OpsConfig
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import IntegrityError
from tasks.common import STEP_TIMEOUT_S, ops_config, retry_on_transient

__all__ = [
    "HostKeys",
    "check_login",
    "configured_keys_path",
    "read_host_keys",
    "replace_authorized_keys",
    "restore_authorized_keys",
    "service_fingerprints",
]

_RETRY = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": 1,
    "retry_condition_fn": retry_on_transient,
}


def _host(host_name: str) -> tuple[str, Host]:
    return ops_config().host(host_name)


def configured_keys_path(cfg: OpsConfig, host: Host) -> str:
    """The host's authorized_keys location from ops.yaml (host var ``authorized_keys``, else
    ``access.authorized_keys``, else the defaults of :func:`kmpops.access.authorized_keys_path`).

    Raises UnsafeValueError for an unsafe path, KeyError for an unknown placeholder.
    """
    return authorized_keys_path(host, cfg.access.authorized_keys)


def _connect(host: Host, key_file: Path | None) -> SSHConnection:
    if key_file is None:
        return SSHConnection.from_host(host)
    return SSHConnection.from_host(host.model_copy(update={"key_file": Path(key_file)}))


HostKeys = dict[str, str]
"""``{"host", "environment", "path", "text"}``: one host's authorized_keys."""


@task(
    name="read-authorized-keys",
    task_run_name="read-keys-{host_name}",
    **_RETRY,
    timeout_seconds=STEP_TIMEOUT_S,
)
def read_host_keys(host_name: str, key_file: Path | None = None) -> HostKeys:
    """The authorized_keys of a host ('' when the file does not exist), at its configured path."""
    env, host = _host(host_name)
    path = configured_keys_path(ops_config(), host)
    with _connect(host, key_file) as conn:
        text = read_authorized_keys(conn, path)
    return {"host": host_name, "environment": env, "path": path, "text": text}


@task(
    name="replace-authorized-keys",
    task_run_name="write-keys-{host_name}",
    **_RETRY,
    timeout_seconds=STEP_TIMEOUT_S,
)
def replace_authorized_keys(host_name: str, text: str, key_file: Path | None = None) -> None:
    """Replace a host's authorized_keys (its configured path) with ``text`` (atomic) and check
    it reads back equal.

    Idempotent. Raises IntegrityError if the file reads back different, the SSH errors
    otherwise. Compensation is the caller's: write the previous text back.
    """
    _env, host = _host(host_name)
    path = configured_keys_path(ops_config(), host)
    with _connect(host, key_file) as conn:
        write_authorized_keys(conn, path, text)
        back = read_authorized_keys(conn, path)
    if [k.fingerprint for k in parse_authorized_keys(back)] != [
        k.fingerprint for k in parse_authorized_keys(text)
    ]:
        raise IntegrityError(f"{host_name}: authorized_keys reads back different from written")


@task(
    name="restore-authorized-keys",
    task_run_name="restore-keys-{host_name}",
    **_RETRY,
    timeout_seconds=STEP_TIMEOUT_S,
)
def restore_authorized_keys(host_name: str, text: str, key_file: Path | None = None) -> str:
    """Compensation: put ``text`` back (at the configured path) unless the host already has it
    (a failed atomic write left it untouched). Returns ``unchanged`` or ``restored``; raises
    the SSH errors."""
    _env, host = _host(host_name)
    path = configured_keys_path(ops_config(), host)
    with _connect(host, key_file) as conn:
        if read_authorized_keys(conn, path) == text:
            return "unchanged"
        write_authorized_keys(conn, path, text)
        if read_authorized_keys(conn, path) != text:
            raise IntegrityError(f"{host_name}: authorized_keys still differs after restore")
    return "restored"


@task(
    name="check-login",
    task_run_name="login-{host_name}",
    cache_policy=NO_CACHE,
    timeout_seconds=STEP_TIMEOUT_S,
)
def check_login(host_name: str, key_file: Path) -> bool:
    """True if the host accepts a login with ``key_file`` (and runs ``true``); never raises
    for a refusal (AuthenticationFailed → False); other connection errors propagate."""
    from kmpops.errors import AuthenticationFailed

    _env, host = _host(host_name)
    try:
        with _connect(host, key_file) as conn:
            return conn.run(["true"], timeout=30).ok
    except AuthenticationFailed:
        return False


def service_fingerprints(cfg: OpsConfig) -> frozenset[str]:
    """Fingerprints of kmp-ops' own SSH keys on every host: key files (encrypted ones from their
    ``.pub``), jump hops' keys and agent keys; one that cannot be read shows as drift."""
    from kmpops.connectors.ssh import own_key_fingerprints

    fps: set[str] = set()
    for env in cfg.environments.values():
        for host in env.hosts:
            fps |= own_key_fingerprints(host)
    return frozenset(fps)
