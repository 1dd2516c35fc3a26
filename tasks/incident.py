"""Incident steps: open/record, escalate, diagnostics, rollback target, health check.

Every step writes to the incident's timeline (records store) and to the audit chain. Diagnostics
run fixed commands from code over SSH (paths shell-quoted), and their output passes the log
redactor before it is stored or rendered. :func:`wait_for_ack` pauses the flow run (it must be
called from the flow, not from a task) with an :class:`AckForm`; its pause key
``ack-<incident>-<level, lowercase>-…`` says which question the run is asking.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from kmpops import release as rel
from kmpops import shellsafe
from kmpops.config import Host, OpsConfig
from kmpops.connectors.notify import Notifier
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import NotFound, UnsafeValueError
from kmpops.plans.approval import TokenBook, parse_token_book
from kmpops.plans.incident import instance_of
from kmpops.redact import redact
from tasks.approval import resume_after_timeout, take_answer
from tasks.common import (
    STEP_TIMEOUT_S,
    audit,
    ops_config,
    records,
    retry_on_transient,
    run_id,
    secret,
)

__all__ = [
    "AckForm",
    "ContainmentFacts",
    "check_service_health",
    "claim_incident",
    "containment_facts",
    "disable_key_everywhere",
    "gather_diagnostics",
    "host_environment",
    "instances_of",
    "inventory",
    "notify_level",
    "open_incident",
    "recent_history",
    "record_phase",
    "resume_after_timeout",
    "rollback_target",
    "run_service_command",
    "wait_for_ack",
]

ACK_POLL_S = 1
_OUTPUT_MAX = 4000


class AckForm(RunInput):
    """The acknowledgement form of an escalation step: the responder's name and own token
    (checked against ``notifications.responder_tokens``)."""

    responder: str = Field(default="", description="who takes the incident (your name)")
    responder_token: str = Field(
        default="", description="your personal token", json_schema_extra={"format": "password"}
    )
    note: str = Field(default="", description="anything the next responder should know")

    def __repr__(self) -> str:  # the token never reaches a log line
        return f"AckForm(responder={self.responder!r}, note={self.note!r})"

    __str__ = __repr__


def _responder_book(cfg: OpsConfig) -> TokenBook | None:
    ref = cfg.notifications.responder_tokens
    return parse_token_book(secret(ref)) if ref is not None else None


def _ack_refusal(
    form: AckForm, raw: dict[str, Any] | None, removed: bool, book: TokenBook | None
) -> str:
    """Why an acknowledgement does not count ("" when it does): no token book, the stored
    answer (with its token) could not be removed from Prefect (fail closed), or the token is
    not the responder's."""
    if book is None:
        return "no responder token book configured (notifications.responder_tokens)"
    if not removed or raw is None:
        return "the answer could not be removed from the run's input (refused: fail closed)"
    token = str(raw.get("responder_token", ""))
    if not book.verify(form.responder.strip(), token):
        return f"{form.responder.strip()!r} is not in the responder book or the token is wrong"
    return ""


def instances_of(cfg: OpsConfig, service: str) -> dict[str, str]:
    """``address:port`` of the service's metrics URL on each host -> host name (how a
    Prometheus ``instance`` label finds its host)."""
    svc = cfg.services.get(service)
    if svc is None or svc.metrics is None or not svc.metrics.url:
        return {}
    out = {}
    for env in cfg.environments.values():
        for host in env.hosts:
            out[instance_of(svc.render(svc.metrics.url, host))] = host.name
    return out


def inventory(cfg: OpsConfig) -> dict[str, list[str]]:
    """Environment -> its host names, from ops.yaml (what containment may ever touch)."""
    return {name: [h.name for h in env.hosts] for name, env in cfg.environments.items()}


@dataclass(frozen=True)
class ContainmentFacts:
    """What the containment plan checks an alert's targets against (from ops.yaml and the key
    files kmp-ops uses; nothing from the alert)."""

    protected: tuple[tuple[str, str], ...]
    own_keys: frozenset[str]
    known_keys: dict[str, str]


def _ip_of_url(url: str | None) -> str | None:
    if not url:
        return None
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
    return host if host and _is_ip(host) else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def containment_facts(cfg: OpsConfig) -> ContainmentFacts:
    """The protected addresses (``incidents.protected_addresses``, every host's address, the
    addresses of kmp-ops' own services: Prefect API, Prometheus, object store, records and
    databases — IP literals; host names must be listed in ``protected_addresses``), kmp-ops'
    own key fingerprints (every host's key file, jump hops' and agent keys) and the known keys."""
    from kmpops.connectors.ssh import own_key_fingerprints

    protected: list[tuple[str, str]] = []
    own: set[str] = set()
    for env in cfg.environments.values():
        for host in env.hosts:
            if _is_ip(host.address):
                protected.append((host.address, f"host {host.name}"))
            own |= own_key_fingerprints(host)  # key file, jump hops' keys, agent keys
    services = {
        "kmp-ops' Prefect API": os.environ.get("PREFECT_API_URL"),
        "kmp-ops' Prometheus": cfg.prometheus.url if cfg.prometheus else None,
        "kmp-ops' object store": getattr(cfg.storage, "endpoint_url", None),
        "kmp-ops' records database": cfg.records.url.replace("+", "-"),
    }
    for name, url in services.items():
        ip = _ip_of_url(url)
        if ip:
            protected.append((ip, name))
    for db_name, db in cfg.databases.items():
        if db.host and _is_ip(db.host):
            protected.append((db.host, f"database {db_name}"))
    protected += [
        (a, "kmp-ops (incidents.protected_addresses)") for a in cfg.incidents.protected_addresses
    ]
    known = {k.fingerprint: k.owner for k in cfg.incidents.known_keys}
    return ContainmentFacts(tuple(protected), frozenset(own), known)


@task(name="claim-incident", cache_policy=NO_CACHE, timeout_seconds=STEP_TIMEOUT_S)
def claim_incident(incident_id: int, alert_key: str | None) -> bool:
    """Take over an open incident that an alert evaluation opened (once: the first response
    that claims it runs it; a second start is a duplicate). The incident must carry
    ``alert_key``; NotFound otherwise. Audited."""
    rec = records()
    row, _ = rec.incident(incident_id)
    if alert_key is not None and row.alert_key != alert_key:
        raise NotFound(f"incident #{incident_id} is not the incident of alert {alert_key}")
    claimed = rec.claim_incident(incident_id)
    audit("incident.claimed" if claimed else "incident.duplicate", f"incident/{incident_id}")
    return claimed


def host_environment(cfg: OpsConfig, host_name: str) -> tuple[str, Host]:
    """(environment, host) of a host name; NotFound if no environment has it."""
    try:
        return cfg.host(host_name)
    except KeyError:
        raise NotFound(f"unknown host {host_name!r}") from None


@task(name="open-incident", cache_policy=NO_CACHE, timeout_seconds=STEP_TIMEOUT_S)
def open_incident(
    title: str, severity: str, alert_key: str | None, details: dict[str, Any]
) -> tuple[int, bool]:
    """Open an incident, or attach the alert to the open incident that already has its key.

    Returns (incident id, created). Audited either way."""
    row, created = records().open_incident(
        title=title, severity=severity, alert_key=alert_key, details=details
    )
    audit(
        "incident.opened" if created else "incident.duplicate",
        f"incident/{row.id}",
        title=title,
        severity=severity,
        alert_key=alert_key,
    )
    return row.id, created


@task(
    name="incident-phase",
    cache_policy=NO_CACHE,
    task_run_name="{phase}: {message}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def record_phase(
    incident_id: int, phase: str, message: str, details: dict[str, Any] | None = None
) -> None:
    """Add a line to the incident timeline and the audit chain (``incident.<phase>``)."""
    records().incident_event(incident_id, phase=phase, message=message, details=details or {})
    audit(f"incident.{phase}", f"incident/{incident_id}", message=message, **(details or {}))


@task(
    name="notify-escalation",
    cache_policy=NO_CACHE,
    task_run_name="notify-{level}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def notify_level(incident_id: int, level: str, title: str, body: str) -> int:
    """Page support level ``level`` on ``notifications.escalation[level]`` (falling back to the
    critical route). Returns how many deliveries succeeded."""
    cfg = ops_config()
    urls = cfg.notifications.escalation.get(level) or cfg.notifications.routes.get("critical", [])  # type: ignore[call-overload]
    deliveries = Notifier({"critical": urls}).send(
        severity="critical",
        title=f"[{level}] incident #{incident_id}: {title}",
        body=body,
        tags=[level, "escalation", f"incident-{incident_id}"],
        dedup_key=f"incident-{incident_id}-{level}",
    )
    return sum(1 for d in deliveries if d.ok)


TIMEOUT_NOTE = "kmpops: acknowledgement timeout"
PAUSE_GRACE_S = 60


def _answer_timeout(flow_run_id: str, pause_key: str) -> None:
    """At the deadline, resume the pause with the timeout answer (if it is still waiting)."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
        if state is not None and state.is_paused() and state.state_details.pause_key == pause_key:
            resume_flow_run(UUID(flow_run_id), run_input={"responder": "", "note": TIMEOUT_NOTE})
    except Exception as exc:  # someone answered at the same moment: their answer wins
        logging.getLogger(__name__).debug("timeout answer not sent: %s", type(exc).__name__)


def wait_for_ack(incident_id: int, level: str, timeout_s: float, summary: str) -> AckForm | None:
    """Pause the flow run until someone acknowledges at ``level`` or ``timeout_s`` passes.

    Returns the form (responder named, token blanked) or None on timeout. An answer counts only
    with the responder's own token from ``notifications.responder_tokens``, and only once the
    stored answer (which carries the token) is removed from the run's input; any other answer
    is refused (logged and audited as ``incident.ack_refused``) and the run pauses again for the
    time left. Call from the flow, not a task.

    The deadline is kept by a timer that answers the pause itself with a timeout note: the
    server-side pause timeout is set later (``PAUSE_GRACE_S``), because an expired pause is
    turned into a Failed run by the server, which is not what an unanswered page is."""
    flow_run_id = run_id()
    book = _responder_book(ops_config())
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        key = f"ack-{incident_id}-{level.lower()}-{uuid4().hex[:8]}"
        timer = None
        if flow_run_id:
            timer = threading.Timer(remaining, _answer_timeout, args=(flow_run_id, key))
            timer.daemon = True
            timer.start()
        try:
            form = pause_flow_run(
                wait_for_input=AckForm.with_initial_data(
                    description=f"**{level}: acknowledge incident #{incident_id}**\n\n{summary}"
                ),
                timeout=max(1, round(remaining)) + PAUSE_GRACE_S,
                poll_interval=ACK_POLL_S,
                key=key,
            )
        except FlowPauseTimeout:
            resume_after_timeout()
            return None
        finally:
            if timer is not None:
                timer.cancel()
        if form.note == TIMEOUT_NOTE and not form.responder.strip():
            return None
        raw, removed = take_answer(flow_run_id)
        if not form.responder.strip():
            get_run_logger().warning("acknowledgement without a responder ignored")
            continue
        why = _ack_refusal(form, raw, removed, book)
        if not why:
            return form.model_copy(update={"responder_token": ""})
        get_run_logger().warning("acknowledgement at %s refused: %s", level, why)
        audit(
            "incident.ack_refused",
            f"incident:{incident_id}",
            level=level,
            responder=form.responder.strip()[:64],
            reason=why,
        )


_PROBES = {
    "uptime and load": "uptime; cat /proc/loadavg",
    "top processes by CPU": "ps -eo pid,user,pcpu,pmem,etime,comm --sort=-pcpu | head -n 8",
    "memory": "free -m",
}


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="gather-diagnostics",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
    task_run_name="diagnostics-{host_name}",
)
def gather_diagnostics(service: str, host_name: str, log_lines: int = 40) -> dict[str, str]:
    """Load, top processes, memory, disk, the service log tail and the current release of one
    host, over SSH. Read-only; output redacted and truncated. A probe that fails reports its
    exit status instead of raising; an unreachable host raises HostUnreachable (retried)."""
    cfg = ops_config()
    _, host = host_environment(cfg, host_name)
    svc = cfg.services.get(service)
    out: dict[str, str] = {}
    with SSHConnection.from_host(host, connect_timeout=5) as conn:
        probes = dict(_PROBES)
        if svc is not None:
            path = shellsafe.validate_path(svc.deploy_path_for(host), what="deploy path")
            log = f"{path}/shared/log/{service}.log"
            probes["disk"] = f"df -h {shellsafe.quote(path)}"
            probes["service log"] = (
                f"tail -n {int(log_lines)} {shellsafe.quote(log)} 2>&1; "
                f"echo; echo \"5xx lines in log: $(grep -c ' 50[0-9] ' {shellsafe.quote(log)})\""
            )
        else:
            probes["disk"] = "df -h /"
        for name, command in probes.items():
            result = conn.run(command, timeout=15)
            text = result.stdout if result.ok else f"(exit {result.exit_status}) {result.stderr}"
            if name == "service log":
                text = result.stdout or result.stderr
            out[name] = redact(text)[-_OUTPUT_MAX:]
        if svc is not None:
            out["current release"] = rel.current_release(conn, svc.deploy_path_for(host)) or "none"
    return out


@task(name="recent-history", cache_policy=NO_CACHE, timeout_seconds=STEP_TIMEOUT_S)
def recent_history(
    service: str, hosts: list[str], limit: int = 10
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Recent releases of ``service`` on ``hosts`` and recent deploy/change audit events, newest
    first, as plain dicts."""
    rec = records()
    releases = [
        {
            "host": r.host,
            "environment": r.environment,
            "version": r.version,
            "state": r.state,
            "deployed_at": r.deployed_at.isoformat() if r.deployed_at else "",
            "deployed_by": r.deployed_by,
        }
        for r in rec.releases(service)
        if not hosts or r.host in hosts
    ][:limit]
    changes = [
        {"ts": e.ts.isoformat(), "action": e.action, "subject": e.subject}
        for e in reversed(rec.audit_events())
        if e.action.startswith(("deploy.", "change.", "release.", "update."))
    ][:limit]
    return releases, changes


@task(
    name="rollback-target",
    cache_policy=NO_CACHE,
    task_run_name="rollback-target-{host_name}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def rollback_target(service: str, host_name: str) -> tuple[str, str | None, str | None]:
    """(environment, current version, version to roll back to) for the service on a host.

    The current version is read from the host; the target is the recorded previous release,
    else the newest other release staged on the host, else None (nothing to roll back to)."""
    cfg = ops_config()
    env, host = host_environment(cfg, host_name)
    svc = cfg.service(service)
    path = svc.deploy_path_for(host)
    with SSHConnection.from_host(host, connect_timeout=5) as conn:
        current = rel.current_release(conn, path)
        previous = records().previous_release(service, env, host_name)
        target = previous.version if previous is not None else None
        if target is None or target == current:
            staged = [v for v in rel.list_releases(conn, path) if v != current]
            target = staged[0] if staged else None
    return env, current, target


@task(
    name="check-service-health",
    cache_policy=NO_CACHE,
    task_run_name="health-{host_name}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def check_service_health(service: str, host_name: str) -> tuple[bool, str]:
    """The service's health check on one host: (healthy, detail). Never raises for unhealthy."""
    cfg = ops_config()
    _, host = host_environment(cfg, host_name)
    svc = cfg.service(service)
    check = svc.health_check
    if check.url is None:
        with SSHConnection.from_host(host, connect_timeout=5) as conn:
            result = rel.check_health_command(
                conn,
                shellsafe.render_command(
                    check.command or "true",
                    {**host.template_values(), "deploy_path": svc.deploy_path_for(host)},
                ),
                retries=check.retries,
                interval=check.interval,
                timeout=check.timeout,
            )
    else:
        result = rel.check_health_url(
            svc.render(check.url, host),
            retries=check.retries,
            interval=check.interval,
            timeout=check.timeout,
        )
    return result.healthy, result.detail


_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="containment-command",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
    task_run_name="{kind}-{host_name}",
)
def run_service_command(service: str, host_name: str, kind: str, address: str = "") -> str:
    """Run the service's ``drain``, ``undrain`` or ``block_address`` command on a host.

    ``address`` (for ``block_address``) must be an IP address or network. Raises NotFound if
    the service has no such command configured (the action stays manual), UnsafeValueError for
    a bad address, CommandFailed if the command exits non-zero. Audited."""
    if kind not in ("drain", "undrain", "block_address"):
        raise ValueError(f"unknown service command {kind!r}")
    cfg = ops_config()
    _, host = host_environment(cfg, host_name)
    svc = cfg.service(service)
    template = getattr(svc, kind)
    if not template:
        raise NotFound(f"service {service} has no {kind} command in ops.yaml")
    values: dict[str, str | int] = {
        **host.template_values(),
        "deploy_path": svc.deploy_path_for(host),
    }
    if kind == "block_address":
        try:
            values["address"] = str(ipaddress.ip_network(address, strict=False))
        except ValueError:
            raise UnsafeValueError(
                f"address: {address!r} is not an IP address or network"
            ) from None
    command = shellsafe.render_command(template, values)
    with SSHConnection.from_host(host, connect_timeout=5) as conn:
        result = conn.run(command, timeout=60, check=True)
    audit(f"incident.{kind}", f"{service}/{host_name}", address=address or None)
    return result.stdout.strip()[-200:]


@task(
    name="disable-key",
    cache_policy=NO_CACHE,
    task_run_name="disable-key-{fingerprint}",
    timeout_seconds=STEP_TIMEOUT_S,
)
def disable_key_everywhere(
    fingerprint: str, keep: list[str], hosts: list[str] | None = None
) -> list[str]:
    """Remove the public key ``fingerprint`` from authorized_keys on ``hosts`` (names of
    ops.yaml; None: every host of every environment); returns the hosts it was removed from.
    ``keep`` are kmp-ops' own key fingerprints, which are never removed (refused with
    PolicyViolation). Raises UnsafeValueError for a malformed fingerprint; hosts that cannot be
    reached raise after the others are done (HostUnreachable naming them)."""
    from kmpops import access
    from kmpops.errors import HostUnreachable, PolicyViolation

    if not _FINGERPRINT.fullmatch(fingerprint):
        raise UnsafeValueError(f"fingerprint: {fingerprint!r} is not an OpenSSH SHA256 fingerprint")
    if fingerprint in keep:
        raise PolicyViolation("refusing to disable kmp-ops' own key (it would lock kmp-ops out)")
    cfg = ops_config()
    removed, unreachable = [], []
    chosen = None if hosts is None else set(hosts)
    for env in cfg.environments.values():
        for host in env.hosts:
            if chosen is not None and host.name not in chosen:
                continue
            path = access.authorized_keys_path(host)
            try:
                with SSHConnection.from_host(host, connect_timeout=5) as conn:
                    text = access.read_authorized_keys(conn, path)
                    kept = access.remove_keys(text, [fingerprint])
                    if kept != text:
                        access.write_authorized_keys(conn, path, kept)
                        removed.append(host.name)
            except HostUnreachable as exc:
                unreachable.append(f"{host.name}: {exc}")
    audit("incident.disable_key", fingerprint, hosts=removed, unreachable=unreachable)
    if unreachable:
        raise HostUnreachable("; ".join(unreachable))
    return removed
