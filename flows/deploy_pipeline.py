"""deploy-pipeline: the guide's deployment process, with approval and a rollback that always lands.

checklist -> plan (dry_run stops here) -> staging -> integration tests -> verify monitoring ->
approval -> production in rolling batches, each verified and baked -> post-deployment.

Verification is the service's configured analysis (tasks/verify.py, kmpops/plans/analysis.py):
on staging after the integration tests (the service's staging tests: a command and/or test
traffic), and on each production batch during its bake. A failed analysis rolls back; an
inconclusive one (no data, too little traffic) rolls back or, under the environment's
``inconclusive: pause`` policy, pauses for a person's decision, recorded like an approval.

Compensation: every host whose ``current`` was (or may have been) switched in this run is in the
run's ledger with the release it had before; any failure after the first switch (unhealthy host
beyond ``max_failures``, failed check, error-rate breach, refused approval, unreachable host, a
crash inside the flow) rolls every ledger host back in parallel (switch back, restart, health
check, record). A host whose rollback fails is audited and reported with a critical notification.
If the process itself dies, each batch's ``deploy.activating`` audit event (written before any
switch) is what ``deploy-recover`` rolls back from once the run is Crashed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from kmpops import shellsafe
from kmpops.context import ResolvedService, RunContext
from kmpops.errors import KmpOpsError, PolicyViolation
from kmpops.outcomes import HostOutcome, failures_of
from kmpops.plans.analysis import AnalysisReport, verification_action
from kmpops.plans.approval import required_approvals
from kmpops.plans.failures import group_failures
from kmpops.plans.freeze import check_freeze
from kmpops.plans.rollout import RolloutPlan, plan_rollout, rollout_must_stop
from kmpops.release import validate_version
from tasks.approval import (
    change_request_refusal_for,
    consume_change_request,
    request_approval,
    requester_for_run,
)
from tasks.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from tasks.audit import anchor_after_change
from tasks.common import audit, notify, run_id
from tasks.context import run_context
from tasks.deploy import (
    ResolvedArtifact,
    activate_releases,
    check_hosts,
    read_current_releases,
    resolve_artifact,
    roll_back_hosts,
    rollback_host,
    run_checklist,
    stage_releases,
)
from tasks.locks import deploy_targets, locked
from tasks.verify import begin_analysis, mark_log_offsets, run_analysis, run_staging_tests


class DeployRequest(BaseModel):
    """What to deploy where. No secrets here: parameters are visible in the UI."""

    service: str = Field(description="service name from ops.yaml")
    version: str = Field(description="release version (letters, digits, '.', '_', '-')")
    environment: str = Field(
        default="production", description="target: staging, or production (via staging)"
    )
    artifact: str | None = Field(
        default=None,
        description="object key in the store, or an absolute local path; "
        "default releases/<service>/<version>.tar.gz",
    )
    dry_run: bool = Field(default=False, description="compute and show the plan, change nothing")
    change_request_id: int | None = Field(default=None, description="approved change request")
    emergency: bool = Field(
        default=False, description="emergency override of a freeze window (one more approver)"
    )
    requested_by: str = Field(
        default="",
        description="who asks for this deploy; they confirm it with their own token before "
        "anyone can approve it (empty: whoever confirms)",
    )
    allow_first_install: bool = Field(default=False, description="hosts without a release")
    bake_seconds: float | None = Field(
        default=None, ge=0, description="override the policy's bake time"
    )

    @field_validator("service", "environment")
    @classmethod
    def _name(cls, value: str) -> str:
        return shellsafe.validate_name(value, what="name")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return validate_version(value)


class RolloutFailed(KmpOpsError):
    """A rollout stopped; every touched host was rolled back (see the message for any that
    could not be)."""


class _Run:
    """State of one pipeline run: its context and resolved service, the compensation ledger,
    timings, evidence."""

    def __init__(self, req: DeployRequest, ctx: RunContext) -> None:
        self.req = req
        self.ctx = ctx
        self.service: ResolvedService = ctx.service(req.service)
        self.ledger: dict[tuple[str, str], str | None] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.done = 0
        self.total = 0
        self.progress_id: Any = None
        self.pruned: dict[str, list[str]] = {}
        self.requested_by = req.requested_by
        self.log_offsets: dict[str, dict[str, int]] = {}
        self.analyses: list[str] = []

    def stage(self, name: str, started: float) -> None:
        """Record (add to) the seconds spent in ``name`` since ``started``."""
        self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - started, 3)


def _plans(
    cfg: Any, req: DeployRequest, envs: list[str], current: dict[str, str | None]
) -> list[RolloutPlan]:
    plans = []
    for env in envs:
        policy = cfg.environment(env).policy
        hosts = [h.name for h in cfg.environment(env).hosts]
        plans.append(
            plan_rollout(
                hosts,
                service=req.service,
                version=req.version,
                environment=env,
                batch_size=policy.batch_size,
                max_failures=policy.max_failures,
                previous={h: current.get(h) for h in hosts},
            )
        )
    return plans


def _failure_table(env: str, failures: dict[str, str]) -> None:
    """Every failed host with its own words: the detail the grouped state message leaves out."""
    create_table_artifact(
        [{"environment": env, "host": h, "error": why} for h, why in sorted(failures.items())],
        key="deploy-host-failures",
        description=f"Hosts that failed in {env}, each with its error",
    )


def _rollout(run: _Run, plan: RolloutPlan, artifact: ResolvedArtifact) -> None:
    req, env, ctx = run.req, plan.environment, run.ctx
    logger = get_run_logger()
    failures: dict[str, str] = {}  # host -> why; said once per distinct reason (group_failures)
    for number, batch in enumerate(plan.batches, start=1):
        t = time.monotonic()
        hosts = [ctx.host(h, env) for h in batch]
        outcome: dict[str, HostOutcome[Any]]
        try:
            outcome = stage_releases(
                run.service, env, hosts, req.version, artifact, label=f"batch-{number}"
            )
        except Exception as exc:  # the task itself broke: no host counts as staged
            outcome = {h: HostOutcome.failed(h, exc) for h in batch}
        staged = [h for h in batch if outcome[h].ok]
        failures.update(failures_of(outcome))
        run.stage(f"upload {env}", t)
        if rollout_must_stop(len(failures), plan.max_failures):  # nothing of this batch is live
            _failure_table(env, failures)
            raise RolloutFailed(
                f"{env} rollout stopped while staging batch {number}/{len(plan.batches)} "
                f"(none of it switched): {len(failures)} host(s) failed "
                f"(max_failures {plan.max_failures}): " + group_failures(failures)
            )
        for host in staged:
            run.ledger[(env, host)] = plan.previous.get(host)
        # Before anything is switched: what deploy-recover needs if this process dies now.
        audit(
            "deploy.activating",
            f"{req.service}/{env}",
            version=req.version,
            batch=number,
            previous={h: plan.previous.get(h) for h in staged},
        )
        for name, offsets in mark_log_offsets(req.service, env, staged).items():
            run.log_offsets.setdefault(name, {}).update(offsets)
        t = time.monotonic()
        activated: dict[str, HostOutcome[Any]]
        try:
            activated = activate_releases(
                run.service,
                env,
                [ctx.host(h, env) for h in staged],
                req.version,
                artifact.sha256,
                label=f"batch-{number}",
            )
        except Exception as exc:  # the task itself broke: every staged host needs the rollback
            activated = {h: HostOutcome.failed(h, exc) for h in staged}
        failed_here = [h for h in staged if not activated[h].ok]
        failures.update(failures_of(activated))
        run.done += len(staged) - len(failed_here)
        for h in staged:
            done = activated[h].value
            run.pruned[h] = list(done.pruned) if done is not None else []
        run.stage(f"activate {env}", t)
        if run.progress_id is not None:
            update_progress_artifact(run.progress_id, progress=100.0 * run.done / run.total)
        audit(
            "deploy.batch",
            f"{req.service}/{env}",
            batch=number,
            hosts=list(batch),
            failures={h: failures[h] for h in batch if h in failures},
        )
        if rollout_must_stop(len(failures), plan.max_failures):
            _failure_table(env, failures)
            raise RolloutFailed(
                f"{env} rollout stopped in batch {number}/{len(plan.batches)}: "
                f"{len(failures)} host(s) failed (max_failures {plan.max_failures}): "
                + group_failures(failures)
            )
        for host in failed_here:  # within tolerance: back out just this host
            logger.warning("host %s failed within max_failures: rolling it back", host)
            rollback_host(
                run.service, env, ctx.host(host, env), run.ledger.pop((env, host)), req.version
            )
            run.notes.append(f"{host} failed and was rolled back (within max_failures)")
        if env != "staging":
            live = [h for h in staged if h not in failed_here]
            _bake_batch(run, env, live, f"{env} batch {number}/{len(plan.batches)}")


def _bake_batch(run: _Run, env: str, hosts: list[str], label: str) -> None:
    """Verify and bake one production batch: smoke checks, then the analysis over the bake."""
    if not hosts:
        return
    req = run.req
    t = time.monotonic()
    start = begin_analysis(req.service, env, hosts, _offsets(run, hosts))
    _check_stage(run, env, hosts, "smoke")
    policy = run.ctx.config.environment(env).policy
    bake = req.bake_seconds if req.bake_seconds is not None else policy.bake_time.total_seconds()
    report = run_analysis(start, bake, label)
    _judge(run, env, report, f"bake of {label} over {bake:g}s")
    run.stage(f"verify+bake {env}", t)


def _offsets(run: _Run, hosts: list[str]) -> dict[str, dict[str, int]]:
    return {
        m: {h: o for h, o in by_host.items() if h in hosts}
        for m, by_host in run.log_offsets.items()
    }


def _judge(run: _Run, env: str, report: AnalysisReport, what: str) -> None:
    """Proceed, roll back (raise PolicyViolation) or pause for a decision, per the verdict and
    the environment's ``inconclusive`` policy; the report goes into an artifact either way."""
    create_table_artifact(
        report.rows() or [{"measurement": "(none configured)"}],
        key="deploy-analysis",
        description=report.describe()[:500],
    )
    run.analyses.append(f"{what}: {report.describe()}")
    policy = run.ctx.config.environment(env).policy
    action = verification_action(report.outcome, policy.inconclusive)
    if action == "proceed":
        return
    if action == "roll_back":
        raise PolicyViolation(f"{what}: {report.describe()}")
    outcome = request_approval(
        subject=f"analysis inconclusive: {run.req.service}@{run.req.version} {what}",
        summary_markdown=(
            f"The analysis of **{what}** was inconclusive:\n\n{report.describe()}\n\n"
            "Approve to continue the rollout, reject to roll it back."
        ),
        policy=policy,
        requested_by=run.requested_by,
        required=max(1, policy.quorum),
    )
    if outcome.approved_by:
        decided = f"approved by {', '.join(outcome.approved_by)}"
    else:
        decided = f"rejected by {outcome.rejected_by}" if outcome.rejected_by else outcome.status
    run.notes.append(f"inconclusive analysis ({what}): decision: {decided}")
    if not outcome.approved:
        raise PolicyViolation(f"{what}: {report.describe()}; decision: {decided}")


def _compensate(run: _Run) -> tuple[list[str], list[str]]:
    """Roll every ledger host back in parallel; returns (rolled back, failed)."""
    req = run.req
    done, failed = roll_back_hosts(req.service, req.version, run.ledger, flag_run_id=run_id())
    if failed:
        notify(
            "critical",
            f"ROLLBACK FAILED: {req.service} {req.version} on {len(failed)} host(s)",
            "These hosts could not be put back on their previous release and need a human:\n"
            + "\n".join(failed),
        )
    run.ledger.clear()
    return done, failed


def _verify_staging(run: _Run, env: str, hosts: list[str]) -> None:
    """Integration tests (checks, then the service's staging tests: a command and/or traffic),
    then the analysis of what they did. The analysis runs even when a test failed (its verdict
    is evidence too); either failing fails the stage."""
    t = time.monotonic()
    req = run.req
    start = begin_analysis(req.service, env, hosts, _offsets(run, hosts))
    problems: list[str] = []
    try:
        _check_stage(run, env, hosts, "integration")
        run_staging_tests(req.service, env, hosts)
    except PolicyViolation as exc:
        problems.append(str(exc))
    window = run.ctx.config.environment(env).policy.bake_time.total_seconds()
    report = run_analysis(start, window or None, "staging")
    run.stage("verify staging", t)
    if problems:
        run.analyses.append(f"verify monitoring on staging: {report.describe()}")
        raise PolicyViolation(
            "; ".join(problems) + f"; verify monitoring on staging: {report.describe()}"
        )
    _judge(run, env, report, "verify monitoring on staging")


def _check_stage(run: _Run, env: str, hosts: list[str], kind: str) -> list[str]:
    try:
        return check_hosts(run.service, env, [run.ctx.host(h, env) for h in hosts], kind)
    except Exception as exc:
        raise PolicyViolation(f"{kind} checks failed on {env}: {exc}") from exc


def _approval_facts(
    req: DeployRequest, plan: RolloutPlan, artifact: ResolvedArtifact
) -> dict[str, Any]:
    """What an approval of ``plan`` is for: shown in the form, hashed into its plan digest."""
    return {
        "service": req.service,
        "version": req.version,
        "environment": plan.environment,
        "hosts": list(plan.hosts),
        "artifact_source": artifact.source,
        "artifact_sha256": artifact.sha256,
    }


@flow(
    name="deploy-pipeline",
    task_runner=ThreadPoolTaskRunner(max_workers=64),
    flow_run_name="deploy-{request.service}-{request.version}-{request.environment}",
)
@locked(
    lambda request: [] if request.dry_run else deploy_targets(request.service, request.environment)
)
def deploy_pipeline(request: DeployRequest) -> dict[str, Any]:
    """Deploy ``request.version`` of ``request.service`` to staging and then production.

    Raises ValueError/KmpOpsError before any change for bad input (unknown service or
    environment, unsafe version), PolicyViolation for a freeze window, a failed gate or a
    refused approval, RolloutFailed when a rollout stopped; in every failure after the first
    switch, all touched hosts have been rolled back first.
    """
    req = request
    logger = get_run_logger()
    ctx = run_context()  # opened by @locked: frozen config, records, fleet, store, locks
    cfg = ctx.config
    svc_name, target = req.service, req.environment
    cfg.service(svc_name)
    cfg.environment(target)
    requested_by = requester_for_run(req.requested_by)
    digest = ctx.digest
    envs = (
        ["staging", target] if target != "staging" and "staging" in cfg.environments else [target]
    )
    subject = f"{svc_name}@{req.version}->{target}"
    run = _Run(req, ctx)
    # The leases are held (nothing read yet): open the run's connections in the background
    # while the request is audited and the artifact resolved and hashed.
    ctx.fleet.warm([h.name for env in envs for h in ctx.hosts(env)])
    run.requested_by = requested_by
    audit(
        "deploy.requested",
        subject,
        dry_run=req.dry_run,
        requested_by=requested_by,
        change_request_id=req.change_request_id,
        emergency=req.emergency,
        config_digest=digest,
    )
    if req.change_request_id is not None:  # refused before anything changes
        why = change_request_refusal_for(
            req.change_request_id, req.service, req.version, target, digest
        )
        if why:
            audit("deploy.refused", subject, reason=why)
            raise PolicyViolation(why)

    now = datetime.now(UTC)
    extra = 0
    overrides: dict[str, bool] = {}  # env -> an emergency overrides its freeze window
    for env in envs:
        decision = check_freeze(
            cfg.environment(env).policy.freeze_windows, now, emergency=req.emergency
        )
        if not decision.allowed:
            audit("deploy.refused", subject, reason=decision.reason)
            raise PolicyViolation(f"{env}: {decision.reason}")
        extra = max(extra, decision.extra_approvers)
        overrides[env] = decision.extra_approvers > 0

    t = time.monotonic()
    artifact = resolve_artifact(svc_name, req.version, req.artifact)
    all_hosts = [(env, h.name) for env in envs for h in cfg.environment(env).hosts]
    current = read_current_releases(run.service, [h for env in envs for h in ctx.hosts(env)])
    report = run_checklist(
        run.service, req.version, artifact, current, req.allow_first_install, req.emergency
    )
    create_table_artifact(
        report.table(),
        key="deploy-checklist",
        description=f"Pre-deployment checklist for {subject}",
    )
    run.stage("checklist", t)
    if not report.passed:
        audit("deploy.refused", subject, reason="checklist", failed=report.failed)
        raise PolicyViolation(f"pre-deployment checklist failed: {', '.join(report.failed)}")

    plans = _plans(cfg, req, envs, current)
    plan_md = "\n\n".join(p.to_markdown() for p in plans) + f"\n\nConfig digest: `{digest}`"
    create_markdown_artifact(plan_md, key="deploy-plan", description=f"Rollout plan {subject}")
    if req.dry_run:
        audit("deploy.dry_run", subject, hosts=[h for p in plans for h in p.hosts])
        return {
            "status": "dry_run",
            "plan": [[list(b) for b in p.batches] for p in plans],
            "current": current,
        }

    run.total = sum(len(p.hosts) for p in plans)
    run.progress_id = create_progress_artifact(
        0.0, key="deploy-progress", description=f"Hosts done for {subject}"
    )
    approvals: list[str] = []
    started = time.monotonic()
    try:
        for plan in plans:
            env = plan.environment
            policy = cfg.environment(env).policy
            # production is approved; staging only when an emergency overrides its freeze
            # (declaring an emergency is a human act: approved and its requester authenticated),
            # or when a release marked bad deploys with one more approver, staging included
            if env != "staging" or overrides.get(env, False) or report.overrides:
                needed = required_approvals(
                    policy_quorum=policy.quorum,
                    approval_required=policy.approval_required,
                    emergency=extra > 0 or bool(report.overrides),
                )
                if needed and req.change_request_id is not None:
                    consume_change_request(
                        req.change_request_id, req, env, digest, needed, subject=subject
                    )
                    approvals.append(f"change request #{req.change_request_id}")
                elif needed:
                    t = time.monotonic()
                    outcome = request_approval(
                        subject=f"deploy {subject}",
                        summary_markdown=plan.to_markdown()
                        + "\n\nChecklist: every gate passed"
                        + (
                            f" (OVERRIDE: {'; '.join(report.overrides)})"
                            if report.overrides
                            else ""
                        )
                        + f". Requested by **{requested_by or '(to be confirmed)'}**.",
                        policy=policy,
                        requested_by=requested_by,
                        required=needed,
                        plan=_approval_facts(req, plan, artifact),
                    )
                    run.stage(f"approval ({env})", t)
                    approvals.append(outcome.summary())
                    if not outcome.approved:
                        raise PolicyViolation(f"approval for {env}: {outcome.summary()}")
                # what was approved was planned on the frozen config: refuse a changed file
                ctx.ensure_config_unchanged(f"deploy {subject} to {env}")
            t = time.monotonic()
            _rollout(run, plan, artifact)
            run.stage(f"deploy {env}", t)
            if env == "staging":
                _verify_staging(run, env, list(plan.hosts))
    except BaseException as exc:
        if run.ledger:
            logger.error("deploy failed (%s): rolling back %d host(s)", exc, len(run.ledger))
            t = time.monotonic()
            rolled, failed = _compensate(run)
            seconds = round(time.monotonic() - t, 3)
            audit(
                "deploy.rolled_back",
                subject,
                error=str(exc)[:500],
                hosts=rolled,
                rollback_failed=failed,
                seconds=seconds,
            )
            if target != "staging":
                anchor_after_change(f"deploy-pipeline rolled back {subject}")
            tail = f"; rolled back {len(rolled)} host(s) in {seconds:g}s" + (
                f"; ROLLBACK FAILED on {'; '.join(failed)}" if failed else ""
            )
            if isinstance(exc, KmpOpsError):
                try:  # the same error, its message saying what the rollback did
                    told = type(exc)(f"{exc}{tail}")
                except Exception:  # a constructor that takes more than a message
                    exc.add_note(tail.removeprefix("; "))
                    raise exc from None
                raise told from exc
            raise
        raise
    # post-deployment (old releases were pruned on each host once it was healthy); the run's
    # connections close with its context
    t = time.monotonic()
    total = round(time.monotonic() - started, 2)
    notes = _release_notes(req, subject, all_hosts, current, approvals, report.table(), run, total)
    create_markdown_artifact(notes, key="release-notes", description=f"Release notes {subject}")
    audit("deploy.completed", subject, hosts=[h for _, h in all_hosts], seconds=total)
    if target != "staging":
        anchor_after_change(f"deploy-pipeline {subject}")
    notify(
        "info",
        f"Deployed {svc_name} {req.version} to {target}",
        f"{len(all_hosts)} hosts in {total}s",
    )
    run.stage("post-deployment", t)
    return {
        "status": "deployed",
        "hosts": [h for _, h in all_hosts],
        "previous": current,
        "approvals": approvals,
        "timings": run.timings,
        "pruned": run.pruned,
        "notes": run.notes,
    }


def _release_notes(
    req: DeployRequest,
    subject: str,
    hosts: list[tuple[str, str]],
    previous: dict[str, str | None],
    approvals: list[str],
    checklist: list[dict[str, str]],
    run: _Run,
    total: float,
) -> str:
    lines = [
        f"# Release {req.service} {req.version}",
        "",
        f"Deployed to {', '.join(sorted({e for e, _ in hosts}))} in {total}s "
        f"(change request: {req.change_request_id or 'none'}).",
        "",
        "## Hosts",
        "",
        "| environment | host | previous | now |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {e} | {h} | {previous.get(h) or '(first install)'} | {req.version} |" for e, h in hosts
    ]
    lines += ["", "## Approvals", ""] + [f"- {a}" for a in approvals or ["none required"]]
    lines += ["", "## Checklist", ""] + [
        f"- {c['gate']}: {c['result']} — {c['evidence']}" for c in checklist
    ]
    lines += ["", "## Verification", ""] + [f"- {a}" for a in run.analyses or ["none"]]
    lines += ["", "## Timings", ""] + [f"- {k}: {v}s" for k, v in run.timings.items()]
    if run.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    return "\n".join(lines)
