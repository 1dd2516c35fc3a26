"""``troubleshoot``: diagnostics for the guide's common issues on chosen hosts.

Per host, over SSH: load and CPUs, memory and swap, disk use of the host's root, the largest
files, the top processes, listening sockets, the tail of the service log; over HTTP: the
service's health endpoint. Pure rules (:mod:`kmpops.plans.diagnosis`) turn the facts into
findings with next steps; the recommended support level (L1/L2/L3) is recorded — escalation
itself belongs to incident response. Read-only. A markdown report and a findings table are
published and the diagnosis is appended to the audit chain.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kmpops.errors import NotFound
from kmpops.plans.diagnosis import Finding, HostFacts, Thresholds, diagnose, recommend_level
from kmpops.shellsafe import validate_name
from tasks.common import audit, ops_config
from tasks.diagnostics import gather_host_facts, service_logs
from tasks.reports import markdown_table, publish_report


class TroubleshootRequest(BaseModel):
    """Where to look and what counts as a problem. Which files are read is ops.yaml's."""

    model_config = ConfigDict(extra="forbid")

    environment: str | None = Field(default=None, description="all hosts of this environment")
    hosts: list[str] = Field(default_factory=list, description="these hosts (default: all)")
    service: str | None = Field(default="web", description="service to check (None: system only)")
    symptom: str = Field(default="", description="what was reported (kept in the record)")
    log_lines: int = Field(default=50, ge=0, le=5000)
    log: str | None = Field(
        default=None, description="which of the service's logs in ops.yaml (default: the first)"
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict) and "log_template" in data:
            raise ValueError(
                "log_template is not a parameter: the logs troubleshoot reads come from ops.yaml "
                "(services.<name>.logs); pick one by name with log"
            )
        return data


def select_hosts(req: TroubleshootRequest) -> list[str]:
    """Host names to diagnose; KeyError names an unknown host or environment."""
    cfg = ops_config()
    if req.hosts:
        for name in req.hosts:
            validate_name(name, what="host")
            cfg.host(name)
        return list(req.hosts)
    envs = [cfg.environment(req.environment)] if req.environment else cfg.environments.values()
    return [h.name for env in envs for h in env.hosts]


def _facts_line(f: HostFacts) -> str:
    if not f.reachable:
        return f"- **{f.host}**: unreachable ({f.error})"
    mem = (
        f"{100 * f.mem_available_kb / f.mem_total_kb:.0f}% mem available"
        if f.mem_total_kb
        else "mem n/a"
    )
    disk = f"disk {f.disk.used_pct:.0f}% of {f.disk.mount}" if f.disk else "disk n/a"
    root = f", root {f.root_used_kb / 1024:.1f} MB" if f.root_used_kb is not None else ""
    health = ""
    if f.health is not None:
        status = f.health.status if f.health.status is not None else "no answer"
        health = f", health {status}"
    return (
        f"- **{f.host}**: load {f.load[0]:.2f}/{f.cpus} CPUs, {mem}, {disk}{root}{health}, "
        f"{len(f.log_tail)} log lines read"
    )


def render_report(
    req: TroubleshootRequest, facts: list[HostFacts], findings: list[Finding], level: str
) -> str:
    """Markdown: symptom, level, findings with next steps, then the facts per host."""
    lines = ["# Troubleshooting report", ""]
    if req.symptom:
        lines += [f"Reported symptom: {req.symptom}", ""]
    lines += [
        f"Hosts: {len(facts)}; findings: {len(findings)}; recommended support level: **{level}**",
        "",
        "## Findings",
        "",
    ]
    if not findings:
        lines.append("No issue found.")
    for f in findings:
        lines.append(f"### {f.host}: {f.issue} ({f.severity})")
        lines.append(f"{f.summary}." + (f" Evidence: {f.evidence}" if f.evidence else ""))
        lines += [f"{i}. {step}" for i, step in enumerate(f.next_steps, 1)]
        lines.append("")
    lines += ["## Facts", ""] + [_facts_line(f) for f in facts]
    return "\n".join(lines) + "\n"


@flow(name="troubleshoot", task_runner=ThreadPoolTaskRunner(max_workers=16))
def troubleshoot(request: TroubleshootRequest | None = None) -> dict[str, Any]:
    """Diagnose the chosen hosts; return findings and the recommended support level.

    Raises KeyError for an unknown host/environment/service and NotFound for a log the
    service does not have in ops.yaml, before touching any host. An unreachable host is a
    finding, not a failure of the run.
    """
    req = request or TroubleshootRequest()
    logger = get_run_logger()
    cfg = ops_config()
    if req.service:
        logs = service_logs(cfg, req.service)
        if req.log is not None and req.log not in logs:
            raise NotFound(
                f"service {req.service} has no log {req.log!r} "
                f"(ops.yaml services.{req.service}.logs: {', '.join(sorted(logs))})"
            )
    names = select_hosts(req)
    futures = {
        name: gather_host_facts.submit(name, req.service, req.log_lines, req.log) for name in names
    }
    facts: list[HostFacts] = []
    for name, fut in futures.items():
        try:
            facts.append(fut.result())
        except Exception as exc:
            facts.append(
                HostFacts(host=name, reachable=False, error=f"{type(exc).__name__}: {exc}")
            )
    findings = [f for host_facts in facts for f in diagnose(host_facts, req.thresholds)]
    level = recommend_level(findings)
    rows = [
        {
            "host": f.host,
            "issue": f.issue,
            "severity": f.severity,
            "summary": f.summary,
            "next step": f.next_steps[0] if f.next_steps else "",
        }
        for f in findings
    ]
    publish_report(
        "troubleshoot",
        render_report(req, facts, findings, level),
        rows,
        description=f"diagnosis of {len(names)} hosts: level {level}",
    )
    audit(
        "troubleshoot.diagnosis",
        req.environment or ",".join(names),
        symptom=req.symptom,
        hosts=names,
        level=level,
        findings=[f"{f.host}:{f.issue}:{f.severity}" for f in findings],
    )
    logger.info(
        "troubleshoot: %d findings, level %s\n%s", len(findings), level, markdown_table(rows)
    )
    return {
        "level": level,
        "findings": [
            {
                "host": f.host,
                "issue": f.issue,
                "severity": f.severity,
                "summary": f.summary,
                "evidence": f.evidence,
                "next_steps": list(f.next_steps),
            }
            for f in findings
        ],
        "hosts": names,
    }
