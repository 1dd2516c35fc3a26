"""Patch steps (patch-hosts, compliance-audit): the hosts' package manager through the run's fleet.

One task per step and environment or batch, the hosts in parallel inside it (each host's
outcome a :class:`~kmpops.outcomes.HostOutcome`). Commands come from :mod:`kmpops.packages`
(values validated, words quoted); the ones that change packages run as root through the host's
become (``sudo -n``: a missing sudo rule is a PrivilegeRefused naming the command, never a
prompt). Every change is read back from the host's package database before it is judged, and
recorded per package in the records store (``package_changes``) and the audit chain. Caching
is off on every task: a patch step never "already ran".
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from kmpops import become as becoming
from kmpops.config import Host, PackagesConfig
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import NotFound
from kmpops.outcomes import HostOutcome
from kmpops.packages import (
    HostPackageState,
    HostVerification,
    InstalledPackage,
    PackageChange,
    PackageManager,
    parse_index_targets,
    parse_reboot,
    parse_release_fields,
    revert_changes,
    verify_host,
)
from tasks.common import STEP_TIMEOUT_S, actor, audit, records, retry_on_transient, run_id
from tasks.context import run_context
from tasks.deploy import _raise_first

__all__ = [
    "HostPatch",
    "HostRevert",
    "apply_packages",
    "check_package_sudo",
    "packages_config",
    "read_installed",
    "read_package_states",
    "revert_packages",
]

T = TypeVar("T")


def packages_config(environment: str) -> PackagesConfig:
    """The environment's ``packages`` section in the run's config; NotFound without one."""
    env = run_context().config.environment(environment)
    if env.packages is None:
        raise NotFound(
            f"environment {environment!r} has no packages section in ops.yaml (the hosts' "
            "package manager: manager: apt, or a configured command)"
        )
    return env.packages


def _manager(cfg: PackagesConfig, host: Host) -> PackageManager:
    return PackageManager(cfg, host.template_values())


def _installed(
    manager: PackageManager, conn: SSHConnection, timeout: float
) -> dict[str, InstalledPackage]:
    result = conn.run(manager.installed_argv(), timeout=timeout, check=True)
    return manager.parse_installed(result.stdout)


def _on_fleet(
    fn: Callable[[Host, SSHConnection], T], hosts: list[Host]
) -> dict[str, HostOutcome[T]]:
    return run_context().fleet.run_on(fn, hosts=[h.name for h in hosts])


@task(
    name="check-package-sudo",
    task_run_name="check-package-sudo-{environment}",
    cache_policy=NO_CACHE,
    timeout_seconds=STEP_TIMEOUT_S,
)
def check_package_sudo(environment: str, hosts: list[Host]) -> None:
    """Ask each host's sudo (``sudo -n -l``, running nothing) whether the login user may run
    the package manager's root commands. Raises PrivilegeRefused naming the first host and
    command refused; changes nothing."""
    cfg = packages_config(environment)

    def one(host: Host, conn: SSHConnection) -> None:
        becoming.check_sudo(conn, host, _manager(cfg, host).root_argvs())

    _raise_first(_on_fleet(one, hosts))


@task(
    name="read-package-states",
    task_run_name="read-package-states-{environment}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
    timeout_seconds=STEP_TIMEOUT_S,
)
def read_package_states(
    environment: str, hosts: list[Host], refresh: bool = True
) -> dict[str, HostPackageState]:
    """Each host's pending updates (the simulated upgrade; security vs other from the
    repositories' Release Label/Suite, with their Release dates), installed packages and
    reboot-required flag; with ``refresh`` the package lists are refreshed first (as root).
    The pending updates are noted in the records (first seen). Changes no package. Raises the
    first host's error naming every host that failed (PrivilegeRefused for a missing rule)."""
    cfg = packages_config(environment)
    timeout = cfg.timeout.total_seconds()
    now = datetime.now(UTC)
    rec = records()

    def one(host: Host, conn: SSHConnection) -> HostPackageState:
        manager = _manager(cfg, host)
        refresh_argv = manager.refresh_argv() if refresh else None
        if refresh_argv:
            conn.run(refresh_argv, timeout=timeout, check=True, become=becoming.become_of(host))
        released = {}
        targets = manager.index_targets_argv()
        if targets:
            rows = parse_index_targets(conn.run(targets, timeout=60, check=True).stdout)
            command = manager.release_fields_command({posixpath.dirname(f) for *_, f in rows})
            if command:
                released = parse_release_fields(conn.run(command, timeout=60).stdout)
        pending = manager.parse_pending(
            conn.run(manager.pending_argv(), timeout=timeout, check=True).stdout, released
        )
        installed = _installed(manager, conn, timeout)
        reboot, reboot_packages = parse_reboot(
            conn.run(manager.reboot_command(), timeout=30).stdout
        )
        rec.observe_pending_updates(
            environment=environment,
            host=host.name,
            updates=[(u.package, u.candidate, u.security) for u in pending],
            at=now,
        )
        return HostPackageState(
            host.name, environment, tuple(pending), installed, reboot, reboot_packages
        )

    outcomes = _on_fleet(one, hosts)
    _raise_first(outcomes)
    return {name: o.value for name, o in outcomes.items()}  # type: ignore[misc]


@task(
    name="read-installed",
    task_run_name="read-installed-{environment}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
    timeout_seconds=STEP_TIMEOUT_S,
)
def read_installed(environment: str, hosts: list[Host]) -> dict[str, dict[str, InstalledPackage]]:
    """Each host's installed packages, read back from its package database (dpkg-query)."""
    cfg = packages_config(environment)

    def one(host: Host, conn: SSHConnection) -> dict[str, InstalledPackage]:
        return _installed(_manager(cfg, host), conn, cfg.timeout.total_seconds())

    outcomes = _on_fleet(one, hosts)
    _raise_first(outcomes)
    return {name: o.value for name, o in outcomes.items()}  # type: ignore[misc]


@dataclass(frozen=True)
class HostPatch:
    """What installing a host's planned packages did, read back from its database."""

    host: str
    verification: HostVerification
    before: dict[str, InstalledPackage]
    exit_status: int
    output_tail: str


@task(
    name="apply-packages",
    task_run_name="apply-packages-{environment}-{label}",
    cache_policy=NO_CACHE,
    timeout_seconds=STEP_TIMEOUT_S,
)
def apply_packages(
    environment: str,
    hosts: list[Host],
    plan: Mapping[str, list[PackageChange]],
    label: str,
) -> dict[str, HostOutcome[HostPatch]]:
    """On every host at once: install exactly the planned versions (as root, one apt call per
    host), then read the database back and compare (:func:`kmpops.packages.verify_host`).
    Each package is recorded (``installed`` or ``failed``) and audited (``patch.host``).

    Never raises for one host: a host whose packages did not all reach their version is an
    outcome with ``verification.ok`` False (apt's exit status and the end of its output kept);
    a connection or sudo error is a failed outcome (the host may or may not have changed: the
    revert reads it back)."""
    cfg = packages_config(environment)
    timeout = cfg.timeout.total_seconds()
    rec = records()
    logger = get_run_logger()

    def one(host: Host, conn: SSHConnection) -> HostPatch:
        manager = _manager(cfg, host)
        changes = list(plan[host.name])
        before = _installed(manager, conn, timeout)
        audit(
            "patch.installing",
            f"{environment}/{host.name}",
            packages={c.package: [c.from_version, c.to_version] for c in changes},
            batch=label,
        )
        result = conn.run(
            manager.install_argv(changes), timeout=timeout, become=becoming.become_of(host)
        )
        after = _installed(manager, conn, timeout)
        check = verify_host(host.name, changes, before, after)
        for row, change in zip(check.rows, changes, strict=True):
            rec.record_package_change(
                run_id=run_id(),
                environment=environment,
                host=host.name,
                package=change.package,
                from_version=row["before"],  # type: ignore[arg-type]
                to_version=change.to_version,
                after_version=row["after"],  # type: ignore[arg-type]
                outcome="installed" if row["ok"] else "failed",
                security=change.security,
                batch=label,
                actor=actor(),
                details={"status": row["status"], "exit_status": result.exit_status},
            )
        tail = (result.stderr.strip() or result.stdout.strip())[-600:]
        audit(
            "patch.host",
            f"{environment}/{host.name}",
            batch=label,
            ok=check.ok,
            failed=check.failed,
            versions={str(r["package"]): [r["before"], r["after"]] for r in check.rows},
            exit_status=result.exit_status,
        )
        if check.ok:
            logger.info(
                "%s: %s", host.name, ", ".join(f"{c.package}={c.to_version}" for c in changes)
            )
        else:
            logger.warning(
                "%s: failed %s (apt exit %s)", host.name, check.failed, result.exit_status
            )
        return HostPatch(host.name, check, before, result.exit_status, tail)

    return _on_fleet(one, hosts)


@dataclass(frozen=True)
class HostRevert:
    """What putting a host back did: packages back on their old version, and the ones that
    could not be put back with why (a person must look: ``flagged``)."""

    host: str
    reverted: list[str] = field(default_factory=list)
    flagged: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, object]] = field(default_factory=list)


@task(
    name="revert-packages",
    task_run_name="revert-packages-{environment}-{label}",
    cache_policy=NO_CACHE,
    timeout_seconds=STEP_TIMEOUT_S,
)
def revert_packages(
    environment: str,
    hosts: list[Host],
    plan: Mapping[str, list[PackageChange]],
    before: Mapping[str, Mapping[str, InstalledPackage]],
    label: str,
) -> dict[str, HostRevert]:
    """Put each host's planned packages back on the versions ``before`` held: read the
    database, and for every package that moved (or is left half-configured) the pinned
    downgrade ``NAME=OLD --allow-downgrades`` from the repositories, then read back again.
    A package apt cannot put back (its old version is in no repository, the manager has no
    downgrade, it was not installed before) is *flagged*: recorded ``flagged``, audited
    ``patch.flagged``. Never raises for a host (a host that cannot be reached is flagged)."""
    cfg = packages_config(environment)
    timeout = cfg.timeout.total_seconds()
    rec = records()

    def one(host: Host, conn: SSHConnection) -> HostRevert:
        manager = _manager(cfg, host)
        changes = list(plan[host.name])
        was = dict(before.get(host.name, {}))
        now = _installed(manager, conn, timeout)
        back, cannot = revert_changes(changes, was, now)
        out = HostRevert(host.name)
        for package in cannot:
            out.flagged[package] = "not installed before the patch: remove it by hand if needed"
        if back:
            argv = manager.downgrade_argv(back)
            why = "the package manager has no downgrade command"
            if argv is not None:
                result = conn.run(argv, timeout=timeout, become=becoming.become_of(host))
                why = (result.stderr.strip() or result.stdout.strip())[-400:] or (
                    f"exit {result.exit_status}"
                )
            after = _installed(manager, conn, timeout)
            for change in back:
                got = after.get(change.package)
                ok = got is not None and got.version == change.to_version and got.ok
                if ok:
                    out.reverted.append(change.package)
                else:
                    out.flagged[change.package] = (
                        f"still {got.version if got else 'not installed'}"
                        f" ({got.status if got else '-'}): {why}"
                    )
                out.rows.append(
                    {
                        "host": host.name,
                        "package": change.package,
                        "from": change.from_version,
                        "back_to": change.to_version,
                        "now": got.version if got else None,
                        "ok": ok,
                    }
                )
                rec.record_package_change(
                    run_id=run_id(),
                    environment=environment,
                    host=host.name,
                    package=change.package,
                    from_version=change.from_version,
                    to_version=change.to_version,
                    after_version=got.version if got else None,
                    outcome="reverted" if ok else "flagged",
                    batch=label,
                    actor=actor(),
                    details={"why": None if ok else out.flagged[change.package]},
                )
        for package, why in out.flagged.items():
            if not any(r["package"] == package for r in out.rows):
                rec.record_package_change(
                    run_id=run_id(),
                    environment=environment,
                    host=host.name,
                    package=package,
                    from_version=None,
                    to_version=now[package].version if package in now else "-",
                    after_version=now[package].version if package in now else None,
                    outcome="flagged",
                    batch=label,
                    actor=actor(),
                    details={"why": why},
                )
        audit(
            "patch.reverted" if not out.flagged else "patch.flagged",
            f"{environment}/{host.name}",
            batch=label,
            reverted=out.reverted,
            flagged=out.flagged,
        )
        return out

    outcomes = _on_fleet(one, hosts)
    results: dict[str, HostRevert] = {}
    for name, outcome in outcomes.items():
        if outcome.ok and outcome.value is not None:
            results[name] = outcome.value
        else:
            flagged = {c.package: f"host unreachable: {outcome.failure}" for c in plan[name]}
            audit("patch.flagged", f"{environment}/{name}", batch=label, flagged=flagged)
            results[name] = HostRevert(name, [], flagged)
    return results
