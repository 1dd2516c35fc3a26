"""``rotate-service-keys``: replace kmp-ops' own SSH client key on the whole fleet.

For each key file in use (hosts sharing a key file rotate together): generate a new ed25519 key
(written beside the old one, mode 0600, never logged or passed as a parameter), add its public
half to every host's authorized_keys, log in with it on every host, and only then remove the
old key from every host and switch the key file (the old private key is deleted). Any failure
rolls back to the old key everywhere: each host gets its previous authorized_keys back and the
new key file is deleted. Artifacts and the audit chain carry fingerprints only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from kmpops.access import (
    add_key,
    fingerprint_of_key_file,
    new_ed25519_keypair,
    parse_public_key,
    remove_keys,
    write_private_key,
)
from kmpops.errors import KmpOpsError
from tasks.access import (
    check_login,
    read_host_keys,
    replace_authorized_keys,
    restore_authorized_keys,
)
from tasks.common import audit, ops_config
from tasks.locks import host_targets, locked
from tasks.reports import markdown_table, publish_report


class RotationFailed(KmpOpsError):
    """The rotation failed; every host was put back on the old key."""


class RotationRequest(BaseModel):
    """Options of a rotation (no key material here)."""

    comment: str = Field(default="kmp-ops", pattern=r"^[A-Za-z0-9@._-]{1,64}$")
    dry_run: bool = False
    verify_old_refused: bool = True
    authorized_keys_path: str | None = None


def _gather(futures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    done, failed = {}, {}
    for host, fut in futures.items():
        try:
            done[host] = fut.result()
        except Exception as exc:
            failed[host] = f"{type(exc).__name__}: {exc}"
    return done, failed


def _rotate_group(key_file: Path, hosts: list[str], req: RotationRequest) -> dict[str, Any]:
    """Rotate one key file on its hosts; raise RotationFailed after rolling back."""
    logger = get_run_logger()
    old_fp = fingerprint_of_key_file(key_file)
    snapshots, failed = _gather(
        {h: read_host_keys.submit(h, req.authorized_keys_path) for h in hosts}
    )
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
            h: replace_authorized_keys.submit(
                h, snapshots[h]["path"], add_key(snapshots[h]["text"], public), key_file
            )
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
        stage = "remove old key"
        removals = {
            h: replace_authorized_keys.submit(
                h,
                snapshots[h]["path"],
                remove_keys(add_key(snapshots[h]["text"], public), [old_fp]),
                new_file,
            )
            for h in hosts
        }
        _done, failed = _gather(removals)
        if failed:
            raise RotationFailed(f"removing the old key failed on {failed}")
    except Exception as exc:
        logger.error("rotation of %s failed at %r; rolling back", key_file.name, stage)
        # the old key is still authorized everywhere until "remove old key", the new one after
        # "add new key": try the old key first, then the new one
        restore_errors = {}
        for host in touched:
            snap = snapshots[host]
            for use in (key_file, new_file):
                try:
                    restore_authorized_keys.fn(host, snap["path"], snap["text"], use)
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
    old_refused: dict[str, bool | str] | None = None
    if req.verify_old_refused:
        # the old private key still exists here: it must now be refused everywhere
        checks, errors = _gather({h: check_login.submit(h, key_file) for h in hosts})
        old_refused = {h: not ok for h, ok in checks.items()} | errors
        still = [h for h, v in old_refused.items() if v is not True]
        if still:
            logger.warning("old key still accepted (or unchecked) on %s", ", ".join(still))
    # switch the key file: the new key replaces the old one under the same path
    pub_path = key_file.with_name(key_file.name + ".pub")
    os.replace(new_file.with_name(new_file.name + ".pub"), pub_path)
    os.replace(new_file, key_file)
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

    Raises RotationFailed (after rolling that key file's hosts back) on the first failing group.
    """
    req = request or RotationRequest()
    cfg = ops_config()
    groups: dict[Path, list[str]] = {}
    for env in cfg.environments.values():
        for host in env.hosts:
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
    return {"rotated": results, "dry_run": req.dry_run}


def public_fingerprint(line: str) -> str:
    """Fingerprint of a public key line (helper for reports and tests)."""
    return parse_public_key(line).fingerprint
