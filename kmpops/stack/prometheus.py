"""A private Prometheus server (Debian's ``/usr/bin/prometheus``) for the local stack.

Config and TSDB live under ``root/prometheus``; it listens on 127.0.0.1 only, with
``--web.enable-lifecycle`` so :func:`reload` can change the scrape targets by rewriting the config
and POSTing ``/-/reload``. Stopped by its pid file, never by name.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kmpops.stack._proc import StackError, read_pid, start_process, stop_process, wait_for_port

__all__ = ["PromInfo", "find_prometheus", "reload", "start", "stop"]

_HOST = "127.0.0.1"
_JOB = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_TARGET = re.compile(r"[A-Za-z0-9._-]+:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}")
_DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+")


@dataclass(frozen=True)
class PromInfo:
    """Where Prometheus listens, where its files are, and how long ``start`` took (seconds)."""

    url: str
    pid_file: Path
    config_file: Path
    start_seconds: float = 0.0


def find_prometheus() -> Path:
    """The prometheus binary (/usr/bin/prometheus, else PATH); raises StackError if missing."""
    debian = Path("/usr/bin/prometheus")
    if debian.is_file():
        return debian
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    raise StackError("the 'prometheus' binary was not found (apt install prometheus)")


def _layout(root: Path) -> dict[str, Path]:
    base = Path(root).resolve() / "prometheus"
    return {
        "base": base,
        "data": base / "data",
        "config": base / "prometheus.yml",
        "pid": base / "prometheus.pid",
        "log": base / "prometheus.log",
        "port": base / "port",
    }


def _scrape_timeout(interval: str) -> str:
    """Prometheus refuses scrape_timeout > scrape_interval; its default timeout is 10s."""
    seconds = _duration_seconds(interval)
    return interval if seconds < 10 else "10s"


def _duration_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", value))


def _config(
    scrape_targets: Mapping[str, Sequence[str]], scrape_interval: str, rule_files: Sequence[Path]
) -> dict[str, Any]:
    """The prometheus.yml document; raises ValueError naming a bad job, target or interval."""
    if not _DURATION.fullmatch(scrape_interval) or _duration_seconds(scrape_interval) <= 0:
        raise ValueError(f"scrape_interval {scrape_interval!r} is not a Prometheus duration")
    jobs = []
    for job, targets in scrape_targets.items():
        if not _JOB.fullmatch(job):
            raise ValueError(f"scrape job name {job!r} is not valid")
        if isinstance(targets, str):
            raise ValueError(f"scrape targets of {job!r} must be a list of host:port")
        for target in targets:
            if not _TARGET.fullmatch(target):
                raise ValueError(f"scrape target {target!r} of job {job!r} is not host:port")
        jobs.append({"job_name": job, "static_configs": [{"targets": list(targets)}]})
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": _scrape_timeout(scrape_interval),
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": jobs,
    }


def _write_config(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(".yml.tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.replace(path)


def _http(url: str, *, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 (our own http:// URL)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _wait_ready(url: str, pid_file: Path, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(pid_file) is None:
            raise StackError(f"prometheus exited during start: {_log_tail(log_file)}")
        try:
            status, _ = _http(f"{url}/-/ready", timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise StackError(f"prometheus at {url} was not ready within {timeout:.0f}s")


def _log_tail(log_file: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(
    root: Path,
    port: int,
    *,
    scrape_targets: Mapping[str, Sequence[str]],
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    timeout: float = 30.0,
) -> PromInfo:
    """Start Prometheus on 127.0.0.1:``port`` scraping ``scrape_targets`` (job -> host:port list).

    Idempotent: if it already runs for ``root``, the config is rewritten and reloaded instead.
    Waits for ``/-/ready``. Raises ValueError for a bad job/target/interval (nothing started) and
    StackError if the server exits or is not ready within ``timeout`` (it is stopped again).
    """
    started = time.monotonic()
    paths = _layout(root)
    document = _config(scrape_targets, scrape_interval, rule_files)
    url = f"http://{_HOST}:{port}"
    info = PromInfo(url=url, pid_file=paths["pid"], config_file=paths["config"])
    paths["data"].mkdir(parents=True, exist_ok=True)
    if read_pid(paths["pid"]) is not None:
        running_port = int(paths["port"].read_text()) if paths["port"].exists() else port
        if running_port != port:
            raise StackError(f"prometheus for {root} already runs on port {running_port}")
        _reload_document(info, document)
        return PromInfo(url, paths["pid"], paths["config"], round(time.monotonic() - started, 3))
    _write_config(paths["config"], document)
    paths["port"].write_text(f"{port}\n")
    argv = [
        str(find_prometheus()),
        f"--config.file={paths['config']}",
        f"--storage.tsdb.path={paths['data']}",
        f"--web.listen-address={_HOST}:{port}",
        "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=2d",
        "--log.level=warn",
    ]
    start_process(argv, pid_file=paths["pid"], log_file=paths["log"], cwd=paths["base"])
    try:
        wait_for_port(port, timeout=timeout, what="prometheus", pid_file=paths["pid"])
        _wait_ready(url, paths["pid"], paths["log"], timeout)
    except StackError:
        stop_process(paths["pid"])
        raise
    return PromInfo(url, paths["pid"], paths["config"], round(time.monotonic() - started, 3))


def _reload_document(info: PromInfo, document: dict[str, Any]) -> None:
    previous = info.config_file.read_text() if info.config_file.exists() else None
    _write_config(info.config_file, document)
    try:
        status, body = _http(f"{info.url}/-/reload", method="POST", timeout=10.0)
    except OSError as err:
        status, body = 0, str(err)
    if status != 200:
        if previous is not None:
            info.config_file.write_text(previous)
        raise StackError(f"prometheus refused the new config ({status}): {body.strip()[:500]}")


def reload(
    info: PromInfo,
    scrape_targets: Mapping[str, Sequence[str]],
    *,
    scrape_interval: str | None = None,
    rule_files: Sequence[Path] | None = None,
) -> None:
    """Replace the scrape targets (and optionally interval/rule files), then POST ``/-/reload``.

    Settings not given are kept from the current config. If Prometheus refuses the new config the
    previous file is put back (the server keeps running on it) and StackError is raised.
    """
    current: dict[str, Any] = yaml.safe_load(info.config_file.read_text()) or {}
    interval = scrape_interval or current.get("global", {}).get("scrape_interval", "1s")
    rules = (
        rule_files if rule_files is not None else [Path(p) for p in current.get("rule_files", [])]
    )
    _reload_document(info, _config(scrape_targets, interval, rules))


def stop(root: Path) -> bool:
    """Stop the Prometheus of ``root`` by its pid file; True if one was running. Keeps the TSDB."""
    return stop_process(_layout(root)["pid"])
