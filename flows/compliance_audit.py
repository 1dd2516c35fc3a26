"""``compliance-audit``: the guide's compliance checks, each with its evidence.

Checks (severity in brackets):

* audit chain intact (``Records.verify_audit``) [critical]
* every production environment requires approval, with at least ``min_approvers`` approvers
  and four-eyes [critical]
* every production release in the records has an approved approval in its run [critical]
* the newest verified backup of every database is younger than its RPO [critical]
* backups obey retention: no expired backup awaits deletion [warning]
* host keys pinned: known_hosts pins the key every host offers [critical]
* no secret literal in ops.yaml: every secret field is a reference [critical]
* sshd accepts only public-key authentication (what the daemon offers to a client that
  tries the ``none`` method: the effective configuration, not a file that may be stale) [critical]
* security patches within SLA: no host of an environment with ``packages`` has a pending
  security update older than ``packages.policy.security_sla_days`` (age from the repository's
  Release date, else from when kmp-ops first saw it pending), read from the hosts' real
  package manager [critical]; each overdue update also fires the ``security_patch_sla`` alert
  (the alert-rule state machine of evaluate-alerts: notification on the severity's routes)

A markdown evidence report and a table artifact are published; the outcome is appended to the
audit chain. The run fails (PolicyViolation) on a failed critical check only when
``fail_on_critical`` is set; otherwise it completes and returns the results.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from kmpops.access import probe_host
from kmpops.config import SECRET_REF_RE, OpsConfig
from kmpops.errors import PolicyViolation
from kmpops.plans.retention import BackupFact, RetentionPolicy, plan_retention
from tasks.common import audit, config_path, ops_config, records, retry_on_transient
from tasks.context import in_run_context
from tasks.reports import CheckResult, markdown_table, publish_report

APPROVED_OUTCOMES = ("approved", "timed_out:approve")
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|private_?key|access_key)", re.I)
_URL_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@", re.I)


class CompliancePolicy(BaseModel):
    """What the audit holds the configuration and records to."""

    production_environments: list[str] = Field(
        default_factory=lambda: ["production"], description="environments audited as production"
    )
    min_approvers: int = Field(default=2, ge=1, description="approvers a production policy lists")
    check_hosts: bool = Field(default=True, description="probe every host's sshd over the network")
    fail_on_critical: bool = Field(
        default=False, description="fail the run when a critical check fails"
    )
    check_patches: bool = Field(
        default=True, description="read every host's pending security updates (patch SLA)"
    )


# -- checks on config and records (pure given their inputs) ----------------------------------


def check_audit_chain() -> CheckResult:
    """The audit chain verifies end to end."""
    report = records().verify_audit()
    if report.ok:
        return CheckResult("audit chain intact", True, evidence=f"{report.events} events verified")
    return CheckResult("audit chain intact", False, evidence=str(report.problem))


def check_approval_policies(cfg: OpsConfig, policy: CompliancePolicy) -> list[CheckResult]:
    """Each production environment requires approval, lists enough approvers, has four-eyes."""
    results = []
    for env_name in policy.production_environments:
        env = cfg.environments.get(env_name)
        if env is None:
            results.append(
                CheckResult(
                    "production approval policy",
                    False,
                    subject=env_name,
                    evidence="environment not in ops.yaml",
                )
            )
            continue
        p = env.policy
        problems = []
        if not p.approval_required:
            problems.append("approval_required is false")
        if len(p.approvers) < policy.min_approvers:
            problems.append(f"{len(p.approvers)} approvers listed (< {policy.min_approvers})")
        if not p.four_eyes:
            problems.append("four_eyes is off")
        if p.timeout_outcome == "approve":
            problems.append("timeout_outcome approves silently")
        evidence = (
            f"approval_required={p.approval_required}, approvers={len(p.approvers)}, "
            f"quorum={p.quorum}, four_eyes={p.four_eyes}, timeout_outcome={p.timeout_outcome}"
        )
        results.append(
            CheckResult(
                "production approval policy",
                not problems,
                subject=env_name,
                evidence=("; ".join(problems) + " — " if problems else "") + evidence,
            )
        )
    return results


def check_release_approvals(policy: CompliancePolicy) -> CheckResult:
    """Every production release was made by a run that holds an approved approval."""
    rec = records()
    releases = []
    for service in ops_config().services:
        for env_name in policy.production_environments:
            releases += rec.releases(service, env_name)
    approved_runs = {
        a.run_id for a in rec.approvals() if a.run_id and a.outcome in APPROVED_OUTCOMES
    }
    missing = [r for r in releases if r.run_id not in approved_runs]
    if not releases:
        return CheckResult(
            "production releases approved", True, evidence="no production release recorded"
        )
    evidence = f"{len(releases) - len(missing)}/{len(releases)} releases have an approval"
    if missing:
        shown = ", ".join(f"{r.service}@{r.version} on {r.host}" for r in missing[:10])
        evidence += f"; without: {shown}" + (" …" if len(missing) > 10 else "")
    return CheckResult(
        "production releases approved",
        not missing,
        evidence=evidence,
        details={"unapproved_release_ids": [r.id for r in missing]},
    )


def check_backup_rpo(cfg: OpsConfig, now: datetime) -> list[CheckResult]:
    """The newest verified backup of each database is younger than the database's RPO."""
    results = []
    rec = records()
    for name, db in sorted(cfg.databases.items()):
        verified = [
            b
            for b in rec.backups(kind="database", name=name, states=("complete",))
            if b.verification == "verified"
        ]
        if not verified:
            results.append(
                CheckResult(
                    "backup within RPO",
                    False,
                    subject=name,
                    evidence=f"no verified backup (RPO {db.rpo})",
                )
            )
            continue
        newest = max(verified, key=lambda b: b.started_at)
        age = now - newest.started_at
        results.append(
            CheckResult(
                "backup within RPO",
                age <= db.rpo,
                subject=name,
                evidence=f"backup #{newest.id} verified, {str(age).split('.')[0]} old "
                f"(RPO {db.rpo})",
            )
        )
    if not results:
        results.append(CheckResult("backup within RPO", True, evidence="no database configured"))
    return results


def check_backup_retention(cfg: OpsConfig, now: datetime) -> CheckResult:
    """No backup past its retention awaits deletion (retention is being applied)."""
    default = RetentionPolicy()
    retention = RetentionPolicy(
        database=cfg.backups["database"].retention
        if "database" in cfg.backups
        else default.database,
        configuration=cfg.backups["configuration"].retention
        if "configuration" in cfg.backups
        else default.configuration,
    )
    facts = [
        BackupFact(
            backup_id=str(b.id),
            kind=b.kind,  # type: ignore[arg-type]
            subject=b.name,
            created_at=b.started_at,
            complete=b.state == "complete",
            verified={"verified": True, "failed": False}.get(b.verification or ""),
        )
        for b in records().backups(states=("complete", "failed"))
        if b.kind in ("database", "configuration")
    ]
    plan = plan_retention(facts, now=now, policy=retention)
    overdue = plan.to_delete
    evidence = (
        f"{len(facts)} backups; retention database {retention.database}, "
        f"configuration {retention.configuration}; {len(overdue)} expired awaiting deletion"
    )
    if overdue:
        evidence += ": " + ", ".join(f"#{d.backup_id} {d.kind}/{d.subject}" for d in overdue[:10])
    return CheckResult(
        "backup retention obeyed", not overdue, severity="warning", evidence=evidence
    )


def find_secret_literals(data: Any, path: str = "") -> list[str]:
    """Field paths of ops.yaml data that hold a secret as a literal instead of a reference.

    A field is secret-bearing when its name looks like one (password, secret, token, key…);
    a URL with ``user:password@`` is a literal credential wherever it is. Values never leave.
    """
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and _SECRET_KEY.search(str(key)):
                if not SECRET_REF_RE.match(value):
                    found.append(sub)
            else:
                found += find_secret_literals(value, sub)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += find_secret_literals(value, f"{path}[{i}]")
    elif isinstance(data, str) and _URL_CREDENTIALS.match(data):
        found.append(path)
    return found


def check_secret_references() -> CheckResult:
    """ops.yaml holds no secret literal: every secret is an env:/file:/prefect: reference."""
    path = config_path()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    refs = ops_config().secret_values()
    literals = find_secret_literals(data)
    evidence = f"{len(refs)} secret fields in {path.name}, all references"
    if literals:
        evidence = f"literal secret in: {', '.join(literals)}"
    return CheckResult("secrets are references", not literals, evidence=evidence)


# -- host checks (one task per host) --------------------------------------------------------


@task(
    name="probe-sshd",
    task_run_name="probe-sshd-{host_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
)
def probe_sshd(host_name: str) -> dict[str, Any]:
    """Handshake with a host's sshd: offered host key vs known_hosts, offered auth methods."""
    _env, host = ops_config().host(host_name)
    probe = probe_host(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.user,
        known_hosts=host.known_hosts,
    )
    return {
        "host": host.name,
        "host_key": f"{probe.host_key_type} {probe.host_key_fingerprint}",
        "pinned": probe.pinned,
        "pin_detail": probe.pin_detail,
        "auth_methods": list(probe.auth_methods),
        "none_auth_accepted": probe.none_auth_accepted,
        "key_only": probe.key_only,
    }


def host_checks(probes: dict[str, dict[str, Any] | BaseException]) -> list[CheckResult]:
    """Two checks per host (key pinned, key-only auth) from its probe or its error."""
    results = []
    for host, probe in probes.items():
        if isinstance(probe, BaseException):
            why = f"probe failed: {type(probe).__name__}: {probe}"
            results.append(CheckResult("host key pinned", False, subject=host, evidence=why))
            results.append(CheckResult("sshd key-only auth", False, subject=host, evidence=why))
            continue
        results.append(
            CheckResult(
                "host key pinned",
                probe["pinned"],
                subject=host,
                evidence=f"{probe['host_key']}: {probe['pin_detail']}",
            )
        )
        offered = ",".join(probe["auth_methods"]) or "(none listed)"
        evidence = f"server offers: {offered}"
        if probe["none_auth_accepted"]:
            evidence = "server accepted 'none' authentication (no credentials at all)"
        results.append(
            CheckResult("sshd key-only auth", probe["key_only"], subject=host, evidence=evidence)
        )
    return results


def check_patch_sla(now: datetime) -> list[CheckResult]:
    """Per host of every environment with ``packages``: no pending security update past the
    environment's SLA. Reads the hosts' package managers (lists refreshed, nothing installed)
    and evaluates the ``security_patch_sla`` alert from the same facts."""
    from kmpops.packages import overdue_security
    from tasks.alerting import evaluate_patch_sla
    from tasks.common import notify
    from tasks.context import run_context
    from tasks.patch import read_package_states

    ctx = run_context()
    envs = {n: e for n, e in ctx.config.environments.items() if e.packages and e.hosts}
    if not envs:
        return []
    results: list[CheckResult] = []
    states = []
    for name, env in envs.items():
        try:
            states += list(read_package_states(name, list(env.hosts)).values())
        except Exception as exc:
            results.append(
                CheckResult(
                    "security patches within SLA",
                    False,
                    subject=name,
                    evidence=f"could not read the hosts' packages: {type(exc).__name__}: {exc}",
                )
            )
    sla = {n: e.packages.policy.security_sla_days for n, e in envs.items() if e.packages}
    overdue, ages = overdue_security(
        states, sla_days=sla, first_seen=records().pending_first_seen(), now=now
    )
    for state in states:
        mine = [o for o in overdue if o.host == state.host]
        pending = ", ".join(f"{u.package} {u.candidate}" for u in state.security) or "none"
        evidence = (
            "; ".join(
                f"{o.package} {o.candidate} pending {o.age_days:g} days since its "
                f"{o.measured_from} {o.since.date().isoformat()} (SLA {o.sla_days} days)"
                for o in mine
            )
            if mine
            else f"pending security updates: {pending} (SLA {sla[state.environment]} days)"
        )
        results.append(
            CheckResult(
                "security patches within SLA",
                not mine,
                subject=state.host,
                evidence=evidence,
                details={"overdue": [o.package for o in mine]},
            )
        )
    severity = max(
        (e.packages.policy.alert_severity for e in envs.values() if e.packages),
        key=("info", "warning", "critical").index,
    )
    samples = [
        (
            {"environment": st.environment, "host": st.host, "package": u.package},
            round(days - sla[st.environment], 3),
        )
        for st, u, days in ages
    ]
    evaluation = evaluate_patch_sla(samples, severity, now)
    for msg in evaluation.messages:
        notify(msg.severity, msg.title, msg.body, msg.dedup_key)
    return results


def render_report(results: list[CheckResult], now: datetime) -> str:
    """The evidence report in markdown: summary, failures first, then every check."""
    failed = [r for r in results if not r.ok]
    critical = [r for r in failed if r.severity == "critical"]
    status = "FAILED" if critical else ("PASSED with warnings" if failed else "PASSED")
    lines = [
        f"# Compliance audit — {status}",
        "",
        f"Run at {now.isoformat(timespec='seconds')}: {len(results)} checks, "
        f"{len(results) - len(failed)} passed, {len(critical)} critical failures, "
        f"{len(failed) - len(critical)} warnings.",
        "",
    ]
    if failed:
        lines += ["## Failures", ""]
        lines += [f"- **{r.check}** {r.subject} ({r.severity}): {r.evidence}" for r in failed]
        lines.append("")
    lines += ["## Evidence", "", markdown_table([r.row() for r in results])]
    return "\n".join(lines) + "\n"


@flow(name="compliance-audit")
@in_run_context
def compliance_audit(policy: CompliancePolicy | None = None) -> dict[str, Any]:
    """Run every compliance check, publish the evidence, record the outcome on the audit chain.

    Returns ``{"passed": bool, "critical_failures": [...], "checks": [...]}``. Raises
    PolicyViolation after publishing when a critical check failed and ``fail_on_critical``.
    Read-only: changes nothing on hosts or in the records besides the audit event.
    """
    policy = policy or CompliancePolicy()
    logger = get_run_logger()
    cfg = ops_config()
    now = datetime.now(UTC)
    results: list[CheckResult] = [check_audit_chain()]
    results += check_approval_policies(cfg, policy)
    results.append(check_release_approvals(policy))
    results += check_backup_rpo(cfg, now)
    results.append(check_backup_retention(cfg, now))
    results.append(check_secret_references())
    if policy.check_hosts:
        hosts = [h.name for env in cfg.environments.values() for h in env.hosts]
        futures = {name: probe_sshd.submit(name) for name in hosts}
        probes: dict[str, dict[str, Any] | BaseException] = {}
        for name, fut in futures.items():
            try:
                probes[name] = fut.result()
            except Exception as exc:
                probes[name] = exc
        results += host_checks(probes)
    if policy.check_patches:
        results += check_patch_sla(now)
    failed = [r for r in results if not r.ok]
    critical = [r for r in failed if r.severity == "critical"]
    publish_report(
        "compliance-audit",
        render_report(results, now),
        [r.row() for r in results],
        description="compliance checks with evidence",
    )
    audit(
        "compliance.audit",
        "compliance",
        passed=not critical,
        checks=len(results),
        failed=[f"{r.check} {r.subject}".strip() for r in failed],
    )
    summary = f"{len(results)} checks, {len(critical)} critical failures, {len(failed)} failed"
    logger.info("compliance audit: %s", summary)
    if critical and policy.fail_on_critical:
        raise PolicyViolation(
            "compliance audit failed: " + "; ".join(f"{r.check} {r.subject}" for r in critical)
        )
    return {
        "passed": not critical,
        "critical_failures": [f"{r.check} {r.subject}".strip() for r in critical],
        "checks": [r.as_dict() for r in results],
    }
