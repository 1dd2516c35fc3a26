"""``patch-hosts``: the guide's OS patch management, with the hosts' real package manager.

1. **notification** — each host's pending updates from a simulated upgrade (``apt-get -s``),
   security vs other (the repository's Release Label/Suite), reboot required; a table artifact
   and a notification;
2. **impact assessment** — which hosts and services, security first, the blast radius over
   every host in the config, the risk; each host's plan pins the exact versions the simulation
   showed (what is approved is what is installed); ``dry_run`` stops here;
3. **testing in staging** — apply on staging, read the versions back, the services' health
   checks, staging tests and analysis; a failure puts staging back and stops;
4. **production in rolling batches with approval** — the environment's approval policy (the
   requester confirms, someone else approves: four-eyes), then ``batch_size`` hosts at a time,
   each batch read back and health-checked before the next; a failed package stops the
   rollout: the failed batch is put back with a pinned downgrade where apt allows it (flagged
   where it does not), later batches are left untouched, earlier ones stay patched (verified);
5. **verification** — every touched host's versions read back from its package database;
6. **documentation** — one record per package and host (records store), a table artifact
   (package, old → new, per host), the audit chain and a closing notification.

The run holds leases on every host it may touch (``tasks.locks.patch_targets``). Parameters
narrow (``packages``, ``kind``), never widen: hosts and commands come from ops.yaml.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from kmpops import shellsafe
from kmpops.config import Host
from kmpops.errors import KmpOpsError, PolicyViolation
from kmpops.packages import (
    HostPackageState,
    InstalledPackage,
    PackageChange,
    assess_impact,
    plan_host,
    validate_package,
)
from kmpops.plans.analysis import verification_action
from kmpops.plans.approval import required_approvals
from kmpops.plans.rollout import plan_rollout
from tasks.approval import request_approval, requester_for_run
from tasks.artifacts import create_markdown_artifact, create_table_artifact
from tasks.audit import anchor_after_change
from tasks.common import audit, notify, run_id
from tasks.context import run_context
from tasks.deploy import check_hosts
from tasks.locks import locked, patch_targets
from tasks.patch import (
    HostPatch,
    HostRevert,
    apply_packages,
    check_package_sudo,
    read_installed,
    read_package_states,
    revert_packages,
)
from tasks.reports import markdown_table
from tasks.verify import begin_analysis, mark_log_offsets, run_analysis, run_staging_tests

__all__ = ["PatchFailed", "PatchRequest", "patch_hosts"]


class PatchRequest(BaseModel):
    """Which updates to apply where (no secrets: parameters are visible in the UI)."""

    environment: str = Field(default="production", description="target (via staging)")
    kind: Literal["security", "all"] = Field(
        default="security", description="security updates only, or every pending update"
    )
    packages: list[str] = Field(
        default_factory=list, description="only these packages (empty: every pending one)"
    )
    requested_by: str = Field(
        default="", description="who asks; they confirm with their own token before approval"
    )
    dry_run: bool = Field(default=False, description="notify and assess only, change nothing")

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        return shellsafe.validate_name(value, what="environment")

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: list[str]) -> list[str]:
        for name in value:
            validate_package(name)
        return value


class PatchFailed(KmpOpsError):
    """A patch stopped: the message names the hosts and packages, the versions before and
    after, what was put back and what was flagged."""


class _Run:
    """State of one patch run: the plans, every host's outcome, the evidence."""

    def __init__(self, req: PatchRequest) -> None:
        self.req = req
        self.ctx = run_context()
        self.plans: dict[str, dict[str, list[PackageChange]]] = {}
        self.states: dict[str, dict[str, HostPackageState]] = {}
        self.rows: list[dict[str, Any]] = []  # the documentation: package, old -> new, per host
        self.untouched: list[str] = []
        self.reverted: dict[str, list[str]] = {}
        self.flagged: dict[str, dict[str, str]] = {}
        self.approvals: list[str] = []
        self.notes: list[str] = []
        self.verification: list[dict[str, Any]] = []
        self.before: dict[str, dict[str, InstalledPackage]] = {}  # host -> before its patch

    def hosts(self, env: str, names: list[str]) -> list[Host]:
        return [self.ctx.host(n, env) for n in names]


def _services(run: _Run, env: str) -> list[str]:
    cfg = run.ctx.config
    pk = cfg.environment(env).packages
    return list(pk.services) if pk and pk.services is not None else sorted(cfg.services)


def _notify_pending(run: _Run) -> None:
    rows = []
    for env, states in run.states.items():
        for host, state in states.items():
            rows.append(
                {
                    "environment": env,
                    "host": host,
                    "security": ", ".join(f"{u.package} {u.candidate}" for u in state.security)
                    or "-",
                    "other": ", ".join(
                        f"{u.package} {u.candidate}" for u in state.pending if not u.security
                    )
                    or "-",
                    "reboot required": "yes" if state.reboot_required else "no",
                }
            )
    create_table_artifact(rows, key="patch-pending", description="Pending updates per host")
    security = sum(len(s.security) for st in run.states.values() for s in st.values())
    total = sum(len(s.pending) for st in run.states.values() for s in st.values())
    reboot = [h for st in run.states.values() for h, s in st.items() if s.reboot_required]
    notify(
        "warning" if security else "info",
        f"Pending updates: {security} security, {total - security} other",
        "\n".join(
            f"{r['environment']}/{r['host']}: security {r['security']}; other {r['other']}"
            + ("; reboot required" if r["reboot required"] == "yes" else "")
            for r in rows
        )
        + (f"\nReboot required on: {', '.join(reboot)}" if reboot else ""),
        dedup_key=f"patch-pending-{run_id()}",
    )


def _apply(run: _Run, env: str, names: list[str], label: str) -> tuple[list[str], list[str]]:
    """Apply the plan on ``names``; returns (patched hosts, failures as text). Each host's
    rows go into the documentation."""
    plan = {n: run.plans[env][n] for n in names}
    outcomes = apply_packages(env, run.hosts(env, names), plan, label)
    failures: list[str] = []
    for name, outcome in outcomes.items():
        patch: HostPatch | None = outcome.value if outcome.ok else None
        if patch is None:
            failures.append(f"{name}: {outcome.failure}")
            continue
        run.before[name] = patch.before
        for row in patch.verification.rows:
            run.rows.append({"environment": env, "batch": label, **row})
        if not patch.verification.ok:
            versions = "; ".join(
                f"{r['package']} {r['before']} -> {r['after']} ({r['status']}, wanted "
                f"{r['target']})"
                for r in patch.verification.rows
                if not r["ok"]
            )
            failures.append(
                f"{name}: {versions}; apt exit {patch.exit_status}: {patch.output_tail[-300:]}"
            )
    return [n for n in names if not any(f.startswith(f"{n}:") for f in failures)], failures


def _put_back(run: _Run, env: str, names: list[str], label: str) -> list[str]:
    """Revert ``names`` to their versions before; returns the lines for the error message."""
    plan = {n: run.plans[env][n] for n in names}
    before = {n: run.before.get(n, run.states[env][n].installed) for n in names}
    results: dict[str, HostRevert] = revert_packages(
        env, run.hosts(env, names), plan, before, label
    )
    lines = []
    for name, result in results.items():
        if result.reverted:
            run.reverted[name] = result.reverted
            lines.append(f"{name}: put back {', '.join(result.reverted)}")
        if result.flagged:
            run.flagged[name] = result.flagged
            lines.append(
                f"{name}: FLAGGED " + "; ".join(f"{p}: {why}" for p, why in result.flagged.items())
            )
        for row in result.rows:
            run.rows.append(
                {
                    "environment": env,
                    "batch": f"{label} (put back)",
                    "host": name,
                    "package": row["package"],
                    "before": row["from"],
                    "target": row["back_to"],
                    "after": row["now"],
                    "status": "reverted" if row["ok"] else "flagged",
                    "ok": row["ok"],
                }
            )
    if run.flagged:
        notify(
            "critical",
            f"PATCH ROLLBACK INCOMPLETE on {len(run.flagged)} host(s)",
            "These hosts could not be put back with a pinned downgrade and need a person:\n"
            + "\n".join(f"{h}: {f}" for h, f in run.flagged.items()),
        )
    return lines


def _mark_logs(run: _Run, env: str, names: list[str], staging: bool) -> dict[str, dict]:
    """Before the packages change: each analysed service's log sizes (service -> measurement
    -> host -> bytes), so the analysis counts only error lines written after the patch."""
    if not staging:
        return {}
    out: dict[str, dict] = {}
    for service in _services(run, env):
        if run.ctx.service(service).config.analysis:
            out[service] = mark_log_offsets(service, env, names)
    return out


def _verify_services(
    run: _Run,
    env: str,
    names: list[str],
    kind: str,
    staging: bool,
    log_offsets: dict[str, dict] | None = None,
) -> None:
    """Health checks of the patched hosts' services; on staging also the service's staging
    tests and analysis (when configured; its log measurements from ``log_offsets``, taken
    before the patch). Raises PolicyViolation on a failure."""
    hosts = run.hosts(env, names)
    for service in _services(run, env):
        resolved = run.ctx.service(service)
        try:
            check_hosts(resolved, env, hosts, kind)
        except Exception as exc:
            raise PolicyViolation(f"{kind} checks of {service} failed on {env}: {exc}") from exc
        if not staging or not resolved.config.analysis:
            continue
        start = begin_analysis(service, env, names, (log_offsets or {}).get(service))
        run_staging_tests(service, env, names)
        window = run.ctx.config.environment(env).policy.bake_time.total_seconds()
        report = run_analysis(start, window or None, f"patch staging {service}")
        action = verification_action(report.outcome, "fail")
        run.notes.append(f"analysis of {service} on {env}: {report.describe()}")
        if action != "proceed":
            raise PolicyViolation(f"analysis of {service} on {env}: {report.describe()}")


def _stage(run: _Run, env: str, names: list[str], label: str, kind: str, staging: bool) -> None:
    """Apply, read back and check one batch; on any failure put the batch back and raise."""
    offsets = _mark_logs(run, env, names, staging)
    patched, failures = _apply(run, env, names, label)
    if not failures:
        try:
            _verify_services(run, env, patched, kind, staging, offsets)
        except PolicyViolation as exc:
            failures.append(str(exc))
    if failures:
        back = _put_back(run, env, names, label)
        raise PatchFailed(
            f"{label} on {env} failed: "
            + "; ".join(failures)
            + (". " + "; ".join(back) if back else "")
        )


def _document(run: _Run, subject: str, status: str, error: BaseException | None) -> None:
    rows = [
        {
            "environment": r["environment"],
            "batch": r["batch"],
            "host": r["host"],
            "package": r["package"],
            "change": f"{r['before'] or '(none)'} → {r['after'] or '(none)'}",
            "wanted": r["target"],
            "status": r["status"],
            "ok": r["ok"],
        }
        for r in run.rows
    ]
    create_table_artifact(
        rows or [{"package": "(nothing changed)"}],
        key="patch-record",
        description=f"Patch record {subject}: package, old → new, per host ({status})",
    )
    doc = [f"# Patch record: {subject} — {status}", ""]
    doc += [f"- **Approvals:** {', '.join(run.approvals) or 'none required'}"]
    if run.untouched:
        doc.append(f"- **Untouched (later batches):** {', '.join(run.untouched)}")
    if run.reverted:
        doc.append(
            "- **Put back:** " + "; ".join(f"{h}: {', '.join(p)}" for h, p in run.reverted.items())
        )
    if run.flagged:
        doc.append(
            "- **FLAGGED (not put back):** "
            + "; ".join(f"{h}: {', '.join(p)}" for h, p in run.flagged.items())
        )
    if error is not None:
        doc += ["", "## Failure", "", f"{type(error).__name__}: {error}"]
    doc += ["", "## Changes", "", markdown_table(rows) if rows else "(none)"]
    if run.verification:
        doc += ["", "## Verification (read back)", "", markdown_table(run.verification)]
    if run.notes:
        doc += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    create_markdown_artifact("\n".join(doc) + "\n", key="patch-report", description=subject)


@flow(
    name="patch-hosts",
    task_runner=ThreadPoolTaskRunner(max_workers=16),
    flow_run_name="patch-{request.environment}-{request.kind}",
)
@locked(lambda request: patch_targets(request.environment))
def patch_hosts(request: PatchRequest) -> dict[str, Any]:
    """Patch the hosts of staging, then of ``request.environment``, with their pending
    updates (see the module docstring for the six steps).

    Returns the plan (``dry_run``), or the outcome: ``status`` (``patched`` / ``nothing to
    do``), per-host versions before and after, approvals. Raises NotFound for an environment
    without a ``packages`` section, PrivilegeRefused when a host's sudo rules do not allow a
    package command (before anything changes), PolicyViolation for a refused approval, and
    PatchFailed when a batch failed — after it was put back (or flagged) and documented.
    """
    req = request
    logger = get_run_logger()
    run = _Run(req)
    ctx = run.ctx
    cfg = ctx.config
    cfg.environment(req.environment)
    envs = (
        ["staging", req.environment]
        if req.environment != "staging" and "staging" in cfg.environments
        else [req.environment]
    )
    who = requester_for_run(req.requested_by)
    subject = f"patch {req.kind} -> {req.environment}"
    audit(
        "patch.requested",
        subject,
        kind=req.kind,
        packages=req.packages,
        dry_run=req.dry_run,
        requested_by=who,
        config_digest=ctx.digest,
    )
    # 1. notification: the real pending updates of every host
    for env in envs:
        run.states[env] = read_package_states(env, ctx.hosts(env))
    _notify_pending(run)
    # 2. impact assessment, security first, pinned versions
    for env in envs:
        run.plans[env] = {
            host: plan_host(state, kind=req.kind, packages=req.packages)
            for host, state in run.states[env].items()
        }
    wanted = set(req.packages)
    offered = {c.package for p in run.plans.values() for cs in p.values() for c in cs}
    if wanted - offered:
        run.notes.append(f"not pending anywhere: {', '.join(sorted(wanted - offered))}")
    impact = assess_impact(
        run.plans,
        hosts_total=sum(len(e.hosts) for e in cfg.environments.values()),
        services=sorted({s for env in envs for s in _services(run, env)}),
        at=datetime.now(UTC),
    )
    impact_md = (
        f"# Patch impact: {subject}\n\nBlast radius: {impact.blast_radius}; "
        f"{impact.security_updates} security and {impact.other_updates} other package "
        f"updates; services: {', '.join(impact.services) or '-'}.\n\n{impact.risk_markdown}\n\n"
        + (markdown_table(list(impact.rows)) if impact.rows else "Nothing to patch.")
        + f"\n\nConfig digest: `{ctx.digest}`\n"
    )
    create_markdown_artifact(impact_md, key="patch-impact", description=f"Impact {subject}")
    audit(
        "patch.assessed",
        subject,
        hosts=impact.hosts_touched,
        hosts_total=impact.hosts_total,
        security=impact.security_updates,
        other=impact.other_updates,
        risk=impact.risk_level,
    )
    result: dict[str, Any] = {
        "pending": {
            env: {
                h: [
                    {
                        "package": u.package,
                        "installed": u.installed,
                        "candidate": u.candidate,
                        "security": u.security,
                        "released": u.released.isoformat() if u.released else None,
                    }
                    for u in s.pending
                ]
                for h, s in states.items()
            }
            for env, states in run.states.items()
        },
        "reboot_required": [
            h for states in run.states.values() for h, s in states.items() if s.reboot_required
        ],
        "plan": {
            env: {h: [f"{c.package}={c.to_version}" for c in cs] for h, cs in p.items() if cs}
            for env, p in run.plans.items()
        },
        "blast_radius": impact.blast_radius,
        "risk": impact.risk_level,
    }
    if req.dry_run:
        audit("patch.dry_run", subject, plan=result["plan"])
        return {"status": "dry_run", **result}
    if not impact.hosts_touched:
        _document(run, subject, "nothing to do", None)
        audit("patch.completed", subject, status="nothing to do")
        return {"status": "nothing to do", **result}
    for env in envs:  # a missing sudo rule stops here, before any host changes
        touched = [h for h, cs in run.plans[env].items() if cs]
        if touched:
            check_package_sudo(env, run.hosts(env, touched))
    started = time.monotonic()
    error: BaseException | None = None
    try:
        for env in envs:
            touched = [h for h, cs in run.plans[env].items() if cs]
            if not touched:
                continue
            policy = cfg.environment(env).policy
            if env == "staging" and env != req.environment:
                # 3. testing in staging
                _stage(run, env, touched, "staging", "integration", staging=True)
                continue
            # 4. production: approval, then rolling batches
            needed = required_approvals(
                policy_quorum=policy.quorum, approval_required=policy.approval_required
            )
            if needed:
                outcome = request_approval(
                    subject=f"patch {env}",
                    summary_markdown=impact_md
                    + f"\n\nRequested by **{who or '(to be confirmed)'}**.",
                    policy=policy,
                    requested_by=who,
                    required=needed,
                    plan={
                        "environment": env,
                        "hosts": touched,
                        "changes": result["plan"].get(env, {}),
                    },
                )
                run.approvals.append(outcome.summary())
                if not outcome.approved:
                    raise PolicyViolation(f"approval for {env}: {outcome.summary()}")
                ctx.ensure_config_unchanged(f"patch {env}")
            rollout = plan_rollout(
                touched,
                service="packages",
                version=ctx.digest[:12],
                environment=env,
                batch_size=policy.batch_size,
                max_failures=0,
            )
            total = len(rollout.batches)
            for number, batch in enumerate(rollout.batches, 1):
                label = f"batch {number}/{total}"
                try:
                    _stage(run, env, list(batch), label, "smoke", staging=False)
                except PatchFailed:
                    run.untouched = [h for b in rollout.batches[number:] for h in b]
                    raise
    except BaseException as exc:
        error = exc
    # 5. verification: read every touched host back
    for env in envs:
        touched = [h for h, cs in run.plans[env].items() if cs]
        if not touched:
            continue
        try:
            now = read_installed(env, run.hosts(env, touched))
        except Exception as exc:  # documented, never hides the first error
            run.notes.append(f"verification of {env} could not read every host: {exc}")
            continue
        for host in touched:
            for change in run.plans[env][host]:
                got = now[host].get(change.package)
                run.verification.append(
                    {
                        "environment": env,
                        "host": host,
                        "package": change.package,
                        "before": change.from_version,
                        "now": got.version if got else None,
                        "status": got.status if got else "not installed",
                        "patched": bool(got and got.version == change.to_version and got.ok),
                    }
                )
    # 6. documentation
    status = "failed" if error else "patched"
    seconds = round(time.monotonic() - started, 1)
    _document(run, subject, status, error)
    audit(
        "patch.completed" if error is None else "patch.failed",
        subject,
        status=status,
        seconds=seconds,
        hosts=sorted({r["host"] for r in run.rows}),
        untouched=run.untouched,
        reverted=run.reverted,
        flagged=run.flagged,
        error=f"{type(error).__name__}: {error}"[:800] if error else None,
    )
    if req.environment != "staging" and run.rows:
        anchor_after_change(f"patch-hosts {subject}")
    notify(
        "critical" if error else "info",
        f"Patch {status}: {subject}",
        f"{len({r['host'] for r in run.rows})} hosts in {seconds}s"
        + (f" — {type(error).__name__}: {error}" if error else ""),
        dedup_key=f"patch-{run_id()}-end",
    )
    logger.info("patch %s: %s", subject, status)
    if error is not None:
        raise error
    return {
        "status": status,
        **result,
        "approvals": run.approvals,
        "verification": run.verification,
        "notes": run.notes,
    }
