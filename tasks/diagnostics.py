"""Diagnostic steps: gather one host's facts over SSH, check a service's health over HTTP.

Read-only: nothing here changes a host. Facts come from one run of
:data:`kmpops.plans.diagnosis.FACTS_SCRIPT` per host (load, memory, df/du of the host's root,
largest files, top processes, listening sockets, tail of the service log).
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace

from prefect import task
from prefect.cache_policies import NO_CACHE

from kmpops.config import Host, OpsConfig
from kmpops.connectors.ssh import SSHConnection
from kmpops.errors import NotFound
from kmpops.plans.diagnosis import FACTS_SCRIPT, HealthFact, HostFacts, parse_facts
from kmpops.shellsafe import validate_absolute_path
from tasks.common import STEP_TIMEOUT_S, ops_config, retry_on_transient

__all__ = [
    "DEFAULT_LOG",
    "check_health",
    "disk_root",
    "gather_host_facts",
    "service_log_path",
    "service_logs",
]

DEFAULT_LOG = "{deploy_path}/shared/log/{service}.log"
"""The log a service has when ops.yaml names none (``services.<name>.logs``), named ``service``."""


def disk_root(cfg: OpsConfig, host: Host, service: str | None) -> str:
    """The directory whose disk use is examined: var ``root``, else the service path, else /.

    Raises UnsafeValueError unless it is a safe absolute path (it reaches ``find``, ``du``
    and ``df`` as an argument: a leading ``-`` would be read as an option).
    """
    if "root" in host.vars:
        root = str(host.vars["root"])
    elif service:
        root = cfg.service(service).deploy_path_for(host)
    else:
        root = "/"
    return validate_absolute_path(root, what=f"host {host.name}: disk root")


def service_logs(cfg: OpsConfig, service: str) -> dict[str, str]:
    """The log templates ops.yaml gives ``service`` (``{"service": DEFAULT_LOG}`` if none)."""
    return dict(cfg.service(service).logs) or {"service": DEFAULT_LOG}


def service_log_path(cfg: OpsConfig, host: Host, service: str | None, log: str | None) -> str:
    """The path of the configured log ``log`` (default: the first) of ``service`` on ``host``.

    '' without a service. Raises NotFound naming the configured logs for an unknown name,
    UnsafeValueError if the rendered path is not a safe absolute path.
    """
    if not service:
        return ""
    logs = service_logs(cfg, service)
    name = log or next(iter(logs))
    if name not in logs:
        known = ", ".join(sorted(logs))
        raise NotFound(
            f"service {service} has no log {name!r} (ops.yaml services.{service}.logs: {known})"
        )
    path = cfg.service(service).render(logs[name], host, service=service)
    return validate_absolute_path(path, what=f"service {service} log {name}")


def check_health(url: str, timeout: float = 5.0) -> HealthFact:
    """GET ``url`` once; never raises (refusals and timeouts become the fact)."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (config URL)
            resp.read(4096)
            return HealthFact(url, resp.status, time.perf_counter() - started)
    except urllib.error.HTTPError as exc:
        return HealthFact(url, exc.code, time.perf_counter() - started, error=str(exc.reason))
    except TimeoutError:
        return HealthFact(url, None, None, error=f"no answer within {timeout:g}s", timed_out=True)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError | socket.timeout):
            return HealthFact(
                url, None, None, error=f"no answer within {timeout:g}s", timed_out=True
            )
        return HealthFact(url, None, None, error=str(reason))


@task(
    timeout_seconds=STEP_TIMEOUT_S,
    name="gather-host-facts",
    task_run_name="facts-{host_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_transient,
)
def gather_host_facts(
    host_name: str,
    service: str | None = None,
    log_lines: int = 50,
    log: str | None = None,
    health_timeout: float = 5.0,
) -> HostFacts:
    """Facts of one host (plus the service's health when ``service`` is given).

    ``log`` names one of the service's logs in ops.yaml (default: the first); no path is
    ever taken from a caller. Raises NotFound for an unknown log name, UnsafeValueError for an
    unsafe path, the SSH connector's errors (HostUnreachable is retried) — the flow records an
    unreachable host as a finding.
    """
    cfg = ops_config()
    _env, host = cfg.host(host_name)
    root = disk_root(cfg, host, service)
    log_path = service_log_path(cfg, host, service, log)
    port = None
    with SSHConnection.from_host(host) as conn:
        result = conn.run(
            ["sh", "-c", FACTS_SCRIPT, "kmpops-diag", root, log_path, str(int(log_lines))],
            timeout=60,
        )
    if service:
        svc = cfg.service(service)
        port_value = host.vars.get(f"{service}_port")
        url = svc.render(svc.health_check.url, host) if svc.health_check.url else None
        if port_value is not None:
            port = int(port_value)
        elif url is not None:
            port = urllib.parse.urlsplit(url).port
        facts = parse_facts(host.name, result.stdout, service_port=port, log_path=log_path)
        if url is not None:
            facts = replace(facts, health=check_health(url, health_timeout))
        return facts
    return parse_facts(host.name, result.stdout, log_path=log_path)
