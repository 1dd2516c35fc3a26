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
from kmpops.plans.diagnosis import FACTS_SCRIPT, HealthFact, HostFacts, parse_facts
from tasks.common import ops_config, retry_on_transient

__all__ = ["check_health", "disk_root", "gather_host_facts", "service_log_path"]

DEFAULT_LOG = "{deploy_path}/shared/log/{service}.log"


def disk_root(cfg: OpsConfig, host: Host, service: str | None) -> str:
    """The directory whose disk use is examined: var ``root``, else the service path, else /."""
    if "root" in host.vars:
        return str(host.vars["root"])
    if service:
        return cfg.service(service).deploy_path_for(host)
    return "/"


def service_log_path(cfg: OpsConfig, host: Host, service: str | None, template: str) -> str:
    """The service's log file on ``host`` ('' without a service)."""
    if not service:
        return ""
    svc = cfg.service(service)
    return svc.render(template, host, service=service)


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
    log_template: str = DEFAULT_LOG,
    health_timeout: float = 5.0,
) -> HostFacts:
    """Facts of one host (plus the service's health when ``service`` is given).

    Raises the SSH connector's errors (HostUnreachable is retried) — the flow records an
    unreachable host as a finding.
    """
    cfg = ops_config()
    _env, host = cfg.host(host_name)
    root = disk_root(cfg, host, service)
    log = service_log_path(cfg, host, service, log_template)
    port = None
    with SSHConnection.from_host(host) as conn:
        result = conn.run(
            ["sh", "-c", FACTS_SCRIPT, "kmpops-diag", root, log, str(int(log_lines))],
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
        facts = parse_facts(host.name, result.stdout, service_port=port, log_path=log)
        if url is not None:
            facts = replace(facts, health=check_health(url, health_timeout))
        return facts
    return parse_facts(host.name, result.stdout, log_path=log)
