"""``backup-configuration``: the guide's 6-hourly incremental configuration backup.

Collects every service's ``config_paths`` from each host over SSH into content-addressed blobs
(a file unchanged since any earlier backup is referenced, not uploaded again) and writes one
manifest per host per run. A table artifact shows files and uploads per host.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.backup import backup_host_configuration, gather_backup_results, hosts_with_config


@flow(name="backup-configuration")
def backup_configuration(
    hosts: list[str] | None = None, environment: str | None = None
) -> list[dict[str, Any]]:
    """Back up the configuration of ``hosts`` (default: every host with config paths, optionally
    of one ``environment``). Returns a summary per host; raises the first failure after every
    host was attempted.
    """
    names = hosts or hosts_with_config(environment)
    return gather_backup_results(
        {name: backup_host_configuration.submit(name) for name in names},
        flow_name="backup-configuration",
        subject="Configuration backup",
        column="host",
        blank={"files": 0, "uploaded": 0, "bytes": 0},
        columns=lambda summary: {
            "files": summary["files"],
            "uploaded": summary["uploaded"],
            "bytes": summary["bytes"],
        },
        description="Configuration backups of this run (uploaded = new blobs)",
    )
