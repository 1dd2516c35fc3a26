"""Troubleshooting: host facts → findings for the guide's common issues, with next steps.

Pure code, no I/O. :data:`FACTS_SCRIPT` is the POSIX shell script a task runs on a host (as
``sh -c FACTS_SCRIPT kmpops-diag ROOT LOG LINES``, every argument quoted); :func:`parse_facts`
turns its output into :class:`HostFacts`; the flow adds the health check it made over HTTP;
:func:`diagnose` maps facts to :class:`Finding` s using :class:`Thresholds`;
:func:`recommend_level` says which support level (L1/L2/L3) should take the case.

Issues (the guide's words): high CPU usage, memory leaks, disk space, network connectivity,
service failures (system); error handling, performance problems, crashes, timeouts (application).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FACTS_SCRIPT",
    "DiskFact",
    "Finding",
    "HealthFact",
    "HostFacts",
    "ProcessFact",
    "Thresholds",
    "diagnose",
    "parse_facts",
    "recommend_level",
]

Severity = Literal["critical", "warning", "info"]
Issue = Literal[
    "unreachable",
    "high-cpu",
    "memory",
    "memory-leak",
    "disk-space",
    "network",
    "service-failure",
    "errors",
    "performance",
    "crash",
    "timeout",
]

FACTS_SCRIPT = r"""
root=$1; log=$2; lines=$3
echo "@@nproc"; getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
echo "@@loadavg"; cat /proc/loadavg 2>/dev/null
echo "@@meminfo"; grep -E '^(MemTotal|MemAvailable|SwapTotal|SwapFree):' /proc/meminfo 2>/dev/null
echo "@@df"; df -Pk "$root" 2>/dev/null | tail -n +2
echo "@@du"; [ "$root" != / ] && du -sk "$root" 2>/dev/null
echo "@@largest"
[ "$root" != / ] && find "$root" -xdev -type f -size +1024k -exec du -k {} + 2>/dev/null \
    | sort -rn | head -n 5
echo "@@ps"; ps -eo pid=,pcpu=,pmem=,rss=,comm= --sort=-pcpu 2>/dev/null | head -n 8
echo "@@listen"; cat /proc/net/tcp /proc/net/tcp6 2>/dev/null
echo "@@log"; if [ -n "$log" ] && [ -r "$log" ]; then tail -n "$lines" "$log"; fi
echo "@@end"
"""

_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL|Exception|Traceback)\b")
_CRASH_LINE = re.compile(
    r"(Traceback|Segmentation fault|core dumped|Killed|out of memory|MemoryError)"
)
_TIMEOUT_LINE = re.compile(r"(?i)\b(timed? ?out|timeout)\b")


class Thresholds(BaseModel):
    """When a fact becomes a finding (warning / critical)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load_per_cpu_warning: float = Field(default=1.0, gt=0)
    load_per_cpu_critical: float = Field(default=2.0, gt=0)
    memory_available_warning_pct: float = Field(default=15.0, ge=0, le=100)
    memory_available_critical_pct: float = Field(default=5.0, ge=0, le=100)
    swap_used_warning_pct: float = Field(default=50.0, ge=0, le=100)
    process_memory_warning_pct: float = Field(
        default=30.0, ge=0, le=100, description="one process holding this much memory: leak?"
    )
    disk_used_warning_pct: float = Field(default=80.0, ge=0, le=100)
    disk_used_critical_pct: float = Field(default=90.0, ge=0, le=100)
    root_budget_mb: float | None = Field(
        default=None, gt=0, description="space the host's root directory may use"
    )
    health_latency_warning_s: float = Field(default=1.0, gt=0)
    log_errors_warning: int = Field(default=1, ge=1)


@dataclass(frozen=True)
class ProcessFact:
    """One process from ``ps``."""

    pid: int
    cpu_pct: float
    mem_pct: float
    rss_kb: int
    command: str


@dataclass(frozen=True)
class DiskFact:
    """The filesystem holding a path (``df -Pk``)."""

    filesystem: str
    mount: str
    size_kb: int
    used_kb: int
    available_kb: int

    @property
    def used_pct(self) -> float:
        """Used share as df computes it (used / (used + available))."""
        total = self.used_kb + self.available_kb
        return 100.0 * self.used_kb / total if total else 0.0


@dataclass(frozen=True)
class HealthFact:
    """An HTTP health check: status code (None = no answer), latency, error text."""

    url: str
    status: int | None
    latency_s: float | None = None
    error: str = ""
    timed_out: bool = False


@dataclass(frozen=True)
class HostFacts:
    """What was gathered on one host."""

    host: str
    reachable: bool = True
    error: str = ""
    cpus: int = 1
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mem_total_kb: int = 0
    mem_available_kb: int = 0
    swap_total_kb: int = 0
    swap_free_kb: int = 0
    disk: DiskFact | None = None
    root_used_kb: int | None = None
    largest_files: tuple[tuple[str, int], ...] = ()
    processes: tuple[ProcessFact, ...] = ()
    listening_ports: frozenset[int] = frozenset()
    service_port: int | None = None
    health: HealthFact | None = None
    log_path: str = ""
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    """One diagnosed issue on one host, with evidence and what to do next."""

    host: str
    issue: Issue
    severity: Severity
    summary: str
    evidence: str = ""
    next_steps: tuple[str, ...] = field(default=())


def _sections(output: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("@@"):
            current = sections.setdefault(line[2:].strip(), [])
        elif current is not None:
            current.append(line)
    return sections


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _listening(lines: Iterable[str]) -> frozenset[int]:
    ports = set()
    for line in lines:
        parts = line.split()
        # /proc/net/tcp: sl local_address rem_address st ...; st 0A is LISTEN
        if len(parts) > 3 and parts[3] == "0A" and ":" in parts[1]:
            try:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return frozenset(ports)


def parse_facts(
    host: str, output: str, *, service_port: int | None = None, log_path: str = ""
) -> HostFacts:
    """:class:`HostFacts` from the output of :data:`FACTS_SCRIPT` (missing parts stay empty)."""
    s = _sections(output)
    cpus = max(1, _int((s.get("nproc") or ["1"])[0].strip(), 1))
    load = (0.0, 0.0, 0.0)
    if s.get("loadavg"):
        words = s["loadavg"][0].split()
        if len(words) >= 3:
            load = (float(words[0]), float(words[1]), float(words[2]))
    mem = {}
    for line in s.get("meminfo", []):
        key, _, rest = line.partition(":")
        mem[key.strip()] = _int(rest.split()[0]) if rest.split() else 0
    disk = None
    for line in s.get("df", []):
        w = line.split()
        if len(w) >= 6:
            disk = DiskFact(w[0], w[5], _int(w[1]), _int(w[2]), _int(w[3]))
    root_used = None
    if s.get("du") and s["du"][0].split():
        root_used = _int(s["du"][0].split()[0])
    largest = []
    for line in s.get("largest", []):
        size, _, path = line.partition("\t") if "\t" in line else line.partition(" ")
        if path:
            largest.append((path.strip(), _int(size.strip())))
    procs = []
    for line in s.get("ps", []):
        w = line.split(None, 4)
        if len(w) == 5:
            try:
                procs.append(ProcessFact(int(w[0]), float(w[1]), float(w[2]), int(w[3]), w[4]))
            except ValueError:
                continue
    return HostFacts(
        host=host,
        cpus=cpus,
        load=load,
        mem_total_kb=mem.get("MemTotal", 0),
        mem_available_kb=mem.get("MemAvailable", 0),
        swap_total_kb=mem.get("SwapTotal", 0),
        swap_free_kb=mem.get("SwapFree", 0),
        disk=disk,
        root_used_kb=root_used,
        largest_files=tuple(largest),
        processes=tuple(procs),
        listening_ports=_listening(s.get("listen", [])),
        service_port=service_port,
        log_path=log_path,
        log_tail=tuple(s.get("log", [])),
    )


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB" if kb < 1024 * 1024 else f"{kb / 1024 / 1024:.2f} GB"


def _system(f: HostFacts, t: Thresholds) -> list[Finding]:
    out: list[Finding] = []
    per_cpu = f.load[0] / f.cpus
    if per_cpu >= t.load_per_cpu_warning:
        top = ", ".join(f"{p.command}({p.pid}) {p.cpu_pct:.0f}%" for p in f.processes[:3])
        out.append(
            Finding(
                f.host,
                "high-cpu",
                "critical" if per_cpu >= t.load_per_cpu_critical else "warning",
                f"load {f.load[0]:.2f} on {f.cpus} CPUs ({per_cpu:.2f} per CPU)",
                f"loadavg {f.load[0]:.2f} {f.load[1]:.2f} {f.load[2]:.2f}; top: {top or 'n/a'}",
                (
                    "identify the top CPU consumer and whether its load is expected",
                    "check for runaway loops or a traffic spike (request rate in Prometheus)",
                    "scale out or throttle the offending workload",
                ),
            )
        )
    if f.mem_total_kb:
        avail_pct = 100.0 * f.mem_available_kb / f.mem_total_kb
        if avail_pct <= t.memory_available_warning_pct:
            out.append(
                Finding(
                    f.host,
                    "memory",
                    "critical" if avail_pct <= t.memory_available_critical_pct else "warning",
                    f"only {avail_pct:.1f}% memory available",
                    f"{_mb(f.mem_available_kb)} of {_mb(f.mem_total_kb)} available",
                    ("find the largest resident processes", "restart or resize the worst offender"),
                )
            )
        hog = [p for p in f.processes if p.mem_pct >= t.process_memory_warning_pct]
        for p in hog:
            out.append(
                Finding(
                    f.host,
                    "memory-leak",
                    "warning",
                    f"{p.command} (pid {p.pid}) holds {p.mem_pct:.0f}% of memory",
                    f"rss {_mb(p.rss_kb)}",
                    (
                        "compare its RSS over time (a steady climb suggests a leak)",
                        "capture a heap profile before restarting it",
                    ),
                )
            )
    if f.swap_total_kb:
        used_pct = 100.0 * (f.swap_total_kb - f.swap_free_kb) / f.swap_total_kb
        if used_pct >= t.swap_used_warning_pct:
            out.append(
                Finding(
                    f.host,
                    "memory",
                    "warning",
                    f"swap {used_pct:.0f}% used",
                    f"{_mb(f.swap_total_kb - f.swap_free_kb)} of {_mb(f.swap_total_kb)} swap used",
                    ("memory pressure: check the largest processes",),
                )
            )
    largest = ", ".join(f"{p} ({_mb(k)})" for p, k in f.largest_files[:3]) or "no file over 1 MB"
    disk_steps = (
        "remove or rotate the largest files (logs, old releases, dumps)",
        "prune old releases (maintenance-weekly with apply)",
        "grow the volume if usage is legitimate",
    )
    if f.disk is not None and f.disk.used_pct >= t.disk_used_warning_pct:
        out.append(
            Finding(
                f.host,
                "disk-space",
                "critical" if f.disk.used_pct >= t.disk_used_critical_pct else "warning",
                f"filesystem {f.disk.mount} {f.disk.used_pct:.0f}% full",
                f"{_mb(f.disk.available_kb)} free of {_mb(f.disk.size_kb)}; largest: {largest}",
                disk_steps,
            )
        )
    if t.root_budget_mb is not None and f.root_used_kb is not None:
        used_mb = f.root_used_kb / 1024
        if used_mb > t.root_budget_mb:
            out.append(
                Finding(
                    f.host,
                    "disk-space",
                    "critical",
                    f"host root uses {used_mb:.1f} MB, over its {t.root_budget_mb:g} MB budget",
                    f"largest: {largest}",
                    disk_steps,
                )
            )
    return out


def _application(f: HostFacts, t: Thresholds) -> list[Finding]:
    out: list[Finding] = []
    errors = [line for line in f.log_tail if _ERROR_LINE.search(line)]
    crashes = [line for line in f.log_tail if _CRASH_LINE.search(line)]
    timeouts = [line for line in f.log_tail if _TIMEOUT_LINE.search(line)]
    h = f.health
    listening = f.service_port is None or f.service_port in f.listening_ports
    if h is not None:
        if h.timed_out:
            out.append(
                Finding(
                    f.host,
                    "timeout",
                    "critical",
                    f"health check timed out ({h.url})",
                    h.error,
                    (
                        "check for blocked workers or a slow dependency",
                        "take a thread dump, then restart",
                    ),
                )
            )
        elif h.status is None:
            crashed = bool(crashes)
            out.append(
                Finding(
                    f.host,
                    "crash" if crashed else "service-failure",
                    "critical",
                    f"service does not answer ({h.url})"
                    + ("; not listening on its port" if not listening else ""),
                    (h.error + ("; log: " + crashes[-1].strip() if crashed else "")).strip("; "),
                    (
                        "read the service log around the last start",
                        "restart the service and watch its health",
                        "roll back to the previous release if it keeps failing",
                    ),
                )
            )
        elif h.status >= 500:
            out.append(
                Finding(
                    f.host,
                    "service-failure",
                    "critical",
                    f"health check answered {h.status}",
                    h.url,
                    (
                        "read the service log for the failing dependency",
                        "roll back if the failure started with the last deploy",
                    ),
                )
            )
        elif h.latency_s is not None and h.latency_s >= t.health_latency_warning_s:
            out.append(
                Finding(
                    f.host,
                    "performance",
                    "warning",
                    f"health check took {h.latency_s:.2f}s",
                    h.url,
                    ("compare latency percentiles (performance-test)", "check CPU and memory"),
                )
            )
    if f.service_port is not None and not listening and (h is None or h.status is not None):
        out.append(
            Finding(
                f.host,
                "network",
                "warning",
                f"nothing listens on port {f.service_port}",
                "from /proc/net/tcp",
                ("check the service's bind address and port configuration",),
            )
        )
    if len(errors) >= t.log_errors_warning:
        out.append(
            Finding(
                f.host,
                "errors",
                "warning",
                f"{len(errors)} error lines in the last {len(f.log_tail)} log lines",
                errors[-1].strip()[:200],
                ("group the errors by message", "check recent changes (deploys, config)"),
            )
        )
    if timeouts and not any(x.issue == "timeout" for x in out):
        out.append(
            Finding(
                f.host,
                "timeout",
                "warning",
                f"{len(timeouts)} timeout lines in the log",
                timeouts[-1].strip()[:200],
                ("check the dependency that times out and its latency",),
            )
        )
    return out


def diagnose(facts: HostFacts, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every finding for one host, critical first. An unreachable host is one finding."""
    t = thresholds or Thresholds()
    if not facts.reachable:
        return [
            Finding(
                facts.host,
                "unreachable",
                "critical",
                "host unreachable over SSH",
                facts.error,
                (
                    "check the host is up and sshd listens",
                    "check network path and firewall",
                    "check host key and credentials",
                ),
            )
        ]
    found = _system(facts, t) + _application(facts, t)
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda x: order[x.severity])


def recommend_level(findings: Sequence[Finding]) -> Literal["none", "L1", "L2", "L3"]:
    """Which support level should take the case.

    none: nothing found. L1: warnings only. L2: a critical finding on one host.
    L3: critical findings on two or more hosts, or a crash (root cause analysis needed).
    """
    if not findings:
        return "none"
    critical = [f for f in findings if f.severity == "critical"]
    if not critical:
        return "L1"
    if len({f.host for f in critical}) >= 2 or any(f.issue == "crash" for f in critical):
        return "L3"
    return "L2"
