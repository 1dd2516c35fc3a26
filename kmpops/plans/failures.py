"""Many hosts, one sentence: identical per-host failures grouped for a run's message and log.

Pure code. A rollout that fails on 500 hosts for one reason must say so once —
``500 hosts: health check failed (exit 1: unhealthy build): prd-1…prd-500`` — not 500 times. Two
messages are "the same" when they differ only in the host's own name, in addresses (each host
has its own ``127.0.0.1:PORT``, its own URL) and in numbers of four digits or more (pids, ports,
byte counts). The per-host detail stays where it belongs: the
run's table artifact and the records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["group_failures", "host_ranges"]

_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_LONG_NUMBER = re.compile(r"(?<![\w.])\d{4,}(?![\w.])")


def _generic(host: str, message: str) -> str:
    """``message`` with the host's name and every address taken out (see the module docstring)."""
    text = _ADDRESS.sub("<address>", message)
    text = _LONG_NUMBER.sub("<n>", text)  # pids, ports, sizes: "exit 1" and "3 attempts" stay
    text = re.sub(rf"(?<![\w.-]){re.escape(host)}(?![\w.-])", "<host>", text)
    while text.startswith(
        "<host>: "
    ):  # "prd-7: HostDeployFailed: prd-7: …" → "HostDeployFailed: …"
        text = text[len("<host>: ") :]
    return re.sub(r"\b(\w+): <host>: ", r"\1: ", text)


def host_ranges(hosts: Sequence[str], *, max_items: int = 6) -> str:
    """``prd-1…prd-4, stg-2, web-a`` : consecutive numbered names as ranges, at most ``max_items``
    items (a range is one item), then ``and N more``. Order: by name prefix, then number."""

    def key(name: str) -> tuple[str, int, str]:
        m = _NUMBERED.match(name)
        return (m.group(1), int(m.group(2)), name) if m else (name, -1, name)

    items: list[tuple[str, int]] = []  # (text, hosts it covers)
    run: list[tuple[str, int, str]] = []

    def flush() -> None:
        if not run:
            return
        if len(run) >= 3:
            items.append((f"{run[0][2]}…{run[-1][2]}", len(run)))
        else:
            items.extend((r[2], 1) for r in run)
        run.clear()

    for k in sorted(key(h) for h in set(hosts)):
        if run and k[1] >= 0 and k[0] == run[-1][0] and k[1] == run[-1][1] + 1:
            run.append(k)
            continue
        flush()
        run.append(k)
    flush()
    shown = items[:max_items]
    text = ", ".join(t for t, _ in shown)
    rest = sum(n for _, n in items[max_items:])
    return f"{text} and {rest} more" if rest else text


def group_failures(failures: Mapping[str, str], *, max_groups: int = 5) -> str:
    """One line for ``failures`` (host → message): identical messages grouped, biggest group first.

    ``{"prd-1": "health check failed", "prd-2": "health check failed"}`` →
    ``2 hosts: health check failed: prd-1, prd-2``. A message only one host has keeps its own
    words (``prd-3: disk full``). More than ``max_groups`` distinct messages end with ``and N
    other failure(s)``. Empty input gives an empty string.
    """
    groups: dict[str, list[str]] = {}
    originals: dict[str, str] = {}
    for host, message in failures.items():
        generic = _generic(host, message)
        groups.setdefault(generic, []).append(host)
        originals.setdefault(generic, message)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    parts = []
    for generic, hosts in ordered[:max_groups]:
        if len(hosts) == 1:
            message = originals[generic]
            own = message if message.startswith(f"{hosts[0]}: ") else f"{hosts[0]}: {message}"
            parts.append(own)
        else:
            parts.append(f"{len(hosts)} hosts: {generic}: {host_ranges(hosts)}")
    hidden = len(ordered) - max_groups
    if hidden > 0:
        parts.append(f"and {hidden} other failure{'s' if hidden > 1 else ''}")
    return "; ".join(parts)
