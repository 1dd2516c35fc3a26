"""``backup-configuration``: the guide's 6-hourly incremental configuration backup.

Collects every service's ``config_paths`` from each host over SSH into content-addressed blobs
(a file unchanged since any earlier backup is referenced, not uploaded again) and writes one
manifest per host per run. A table artifact shows files and uploads per host.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.backup import backup_host_configuration, host_config_roots
from tasks.common import notify, ops_config


def _hosts_with_config(environment: str | None) -> list[str]:
    cfg = ops_config()
    names = []
    for env_name, env in cfg.environments.items():
        if environment is not None and env_name != environment:
            continue
        names += [h.name for h in env.hosts if host_config_roots(h.name)]
    return names


@flow(name="backup-configuration")
def backup_configuration(
    hosts: list[str] | None = None, environment: str | None = None
) -> list[dict[str, Any]]:
    """Back up the configuration of ``hosts`` (default: every host with config paths, optionally
    of one ``environment``). Returns a summary per host; raises the first failure after every
    host was attempted.
    """
    names = hosts or _hosts_with_config(environment)
    futures = {name: backup_host_configuration.submit(name) for name in names}
    done: list[dict[str, Any]] = []
    failures: list[tuple[str, Exception]] = []
    rows = []
    for name, future in futures.items():
        try:
            summary = future.result()
        except Exception as exc:  # collect, report, re-raise below
            failures.append((name, exc))
            rows.append(
                {
                    "host": name,
                    "result": f"FAILED: {type(exc).__name__}",
                    "files": 0,
                    "uploaded": 0,
                    "bytes": 0,
                }
            )
            continue
        done.append(summary)
        rows.append(
            {
                "host": name,
                "result": "complete",
                "files": summary["files"],
                "uploaded": summary["uploaded"],
                "bytes": summary["bytes"],
            }
        )
    create_table_artifact(
        key="backup-configuration",
        table=rows,
        description="Configuration backups of this run (uploaded = new blobs)",
    )
    if failures:
        failed = ", ".join(n for n, _ in failures)
        notify(
            "critical",
            f"Configuration backup failed: {failed}",
            "\n".join(f"- {n}: {type(e).__name__}: {e}" for n, e in failures),
            dedup_key=f"backup-configuration:{failed}",
        )
        raise failures[0][1]
    return done
