"""``rotate-service-keys``: replace kmp-ops' own SSH client key on the whole fleet.

For each key file in use (hosts sharing a key file rotate together): generate a new ed25519 key
(written beside the old one, mode 0600, never logged or passed as a parameter), add its public
half to every host's authorized_keys and log in with it on every host. Any failure up to here
rolls back: each host gets its previous authorized_keys back and the new key file is deleted.
Then the key file is switched (atomic rename; the old key is kept as ``.<name>.previous``,
mode 0600) and only then is the old key removed from every host. At every point kmp-ops can
log in to every host with the key file it has: before the switch the old key is authorized
everywhere, after it the new one is. A failure (or a kill) after the switch leaves the new
key in use; the next run removes the leftover old key too. The authorized_keys location comes
from ops.yaml (no path parameter). Artifacts and the audit chain carry fingerprints only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.provision_access import REMOVED_PARAMETERS, refuse_removed
from kmpops.access import (
    add_key,
    fingerprint_of_key_file,
    new_ed25519_keypair,
    parse_public_key,
    remove_keys,
    write_private_key,
)
from kmpops.errors import KmpOpsError
from kmpops.secrets import write_secret_file
from tasks.access import (
    check_login,
    read_host_keys,
    replace_authorized_keys,
    restore_authorized_keys,
)
from tasks.audit import anchor_after_change
from tasks.common import audit, ops_config
from tasks.locks import host_targets, locked
from tasks.reports import markdown_table, publish_report


class RotationFailed(KmpOpsError):
    """The rotation failed: before the switch every host was put back on the old key; after
    it the new key is in use everywhere and the message names hosts that still have the old."""


class RotationRequest(BaseModel):
    """Options of a rotation (no key material here)."""

    model_config = ConfigDict(extra="forbid")

    comment: str = Field(default="kmp-ops", pattern=r"^[A-Za-z0-9@._-]{1,64}$")
    dry_run: bool = False
    verify_old_refused: bool = True

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return refuse_removed(data, REMOVED_PARAMETERS)


def previous_key_file(key_file: Path) -> Path:
    """Where the old key is kept between the switch and its removal from every host."""
    return key_file.with_name(f".{key_file.name}.previous")


def _gather(futures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    done, failed = {}, {}
    for host, fut in futures.items():
        try:
            done[host] = fut.result()
        except Exception as exc:
            failed[host] = f"{type(exc).__name__}: {exc}"
    return done, failed


def _rotate_group(key_file: Path, hosts: list[str], req: RotationRequest) -> dict[str, Any]:
    """Rotate one key file on its hosts; raise RotationFailed (rolled back before the switch)."""
    logger = get_run_logger()
    old_fp = fingerprint_of_key_file(key_file)
    previous = previous_key_file(key_file)
    # a run killed after its switch left the key before that one authorized: remove it too
    leftover = {fingerprint_of_key_file(previous)} - {old_fp} if previous.exists() else set()
    snapshots, failed = _gather({h: read_host_keys.submit(h) for h in hosts})
    if failed:
        raise RotationFailed(
            f"{key_file}: cannot read authorized_keys on {failed}; nothing changed"
        )
    if req.dry_run:
        return {"key_file": str(key_file), "old": old_fp, "new": None, "hosts": hosts}
    private, public = new_ed25519_keypair(req.comment)
    new_file = key_file.with_name(f".{key_file.name}.rotating")
    write_private_key(new_file, private, public)
    del private
    stage = "add new key"
    touched: list[str] = []
    try:
        adds = {
            h: replace_authorized_keys.submit(h, add_key(snapshots[h]["text"], public), key_file)
            for h in hosts
        }
        touched = list(hosts)
        _done, failed = _gather(adds)
        if failed:
            raise RotationFailed(f"adding the new key failed on {failed}")
        stage = "log in with new key"
        logins, failed = _gather({h: check_login.submit(h, new_file) for h in hosts})
        refused = [h for h, ok in logins.items() if not ok]
        if failed or refused:
            raise RotationFailed(f"login with the new key failed on {refused or failed}")
    except Exception as exc:
        logger.error("rotation of %s failed at %r; rolling back", key_file.name, stage)
        # the old key is authorized everywhere until the switch: try it first, then the new one
        restore_errors = {}
        for host in touched:
            for use in (key_file, new_file):
                try:
                    restore_authorized_keys.fn(host, snapshots[host]["text"], use)
                    restore_errors.pop(host, None)
                    break
                except Exception as err:
                    restore_errors[host] = f"{type(err).__name__}: {err}"
        with contextlib.suppress(FileNotFoundError):
            new_file.unlink()
        new_file.with_name(new_file.name + ".pub").unlink(missing_ok=True)
        audit(
            "access.rotation_rolled_back",
            str(key_file),
            stage=stage,
            old=old_fp,
            new=public.fingerprint,
            restore_errors=restore_errors,
        )
        raise RotationFailed(
            f"{key_file.name}: rotation failed at {stage!r} ({exc}); "
            + (
                "rolled back on every host"
                if not restore_errors
                else f"NOT restored: {restore_errors}"
            )
        ) from exc
    # Switch: both keys are authorized everywhere, so whichever file a kill leaves logs in.
    write_secret_file(previous, key_file.read_bytes())
    pub_path = key_file.with_name(key_file.name + ".pub")
    os.replace(new_file.with_name(new_file.name + ".pub"), pub_path)
    os.replace(new_file, key_file)
    audit("access.key_switched", str(key_file), old=old_fp, new=public.fingerprint, hosts=hosts)
    drop = [old_fp, *sorted(leftover)]
    removals = {
        h: replace_authorized_keys.submit(
            h, remove_keys(add_key(snapshots[h]["text"], public), drop), key_file
        )
        for h in hosts
    }
    _done, failed = _gather(removals)
    if failed:
        audit("access.rotation_incomplete", str(key_file), old=old_fp, still_on=sorted(failed))
        raise RotationFailed(
            f"{key_file.name}: the new key {public.fingerprint} is in use on every host, but "
            f"removing the old key failed on {failed}; run rotate-service-keys again to "
            "remove it"
        )
    old_refused: dict[str, bool | str] | None = None
    if req.verify_old_refused:
        # the old private key is still kept here: it must now be refused everywhere
        checks, errors = _gather({h: check_login.submit(h, previous) for h in hosts})
        old_refused = {h: not ok for h, ok in checks.items()} | errors
        still = [h for h, v in old_refused.items() if v is not True]
        if still:
            logger.warning("old key still accepted (or unchecked) on %s", ", ".join(still))
    previous.unlink(missing_ok=True)
    audit(
        "access.rotated",
        str(key_file),
        old=old_fp,
        new=public.fingerprint,
        hosts=hosts,
        old_refused=old_refused,
    )
    return {
        "key_file": str(key_file),
        "old": old_fp,
        "new": public.fingerprint,
        "hosts": hosts,
        "old_refused": old_refused,
    }


@flow(name="rotate-service-keys", task_runner=ThreadPoolTaskRunner(max_workers=16))
@locked(lambda request: [] if request is not None and request.dry_run else host_targets())
def rotate_service_keys(request: RotationRequest | None = None) -> dict[str, Any]:
    """Rotate every key file kmp-ops uses; returns old/new fingerprints per key file.

    Raises RotationFailed on the first failing group (rolled back if it failed before the
    switch; after it, the new key is in use and the message names what is left to remove).
    """
    req = request or RotationRequest()
    cfg = ops_config()
    groups: dict[Path, list[str]] = {}
    for env in cfg.environments.values():
        for host in env.hosts:
            if host.key_file is None:  # an agent-held key: the agent's owner rotates it
                continue
            groups.setdefault(Path(host.key_file).resolve(), []).append(host.name)
    results = [_rotate_group(key_file, hosts, req) for key_file, hosts in groups.items()]
    rows = [
        {"key_file": r["key_file"], "old": r["old"], "new": r["new"], "hosts": len(r["hosts"])}
        for r in results
    ]
    verb = "Plan" if req.dry_run else "Rotated"
    publish_report(
        "rotate-service-keys",
        f"# Service key rotation — {verb}\n\n" + markdown_table(rows) + "\n",
        rows,
    )
    if not req.dry_run:  # kmp-ops' own keys changed on every host, production included
        anchor_after_change("rotate-service-keys")
    return {"rotated": results, "dry_run": req.dry_run}


def public_fingerprint(line: str) -> str:
    """Fingerprint of a public key line (helper for reports and tests)."""
    return parse_public_key(line).fingerprint
