"""``backup-database``: the guide's daily full database backup (``backups.database``).

Each configured database (or the ones named) is dumped straight into the object store by one
task; the catalog marks a backup complete only after its upload was confirmed. A table artifact
lists what was backed up; a failure notifies at critical severity and fails the run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.backup import backup_database_to_store, bounded, gather_backup_results
from tasks.common import ops_config


@flow(name="backup-database", log_prints=False)
def backup_database(databases: list[str] | None = None) -> list[dict[str, Any]]:
    """Back up ``databases`` (default: every database in ops.yaml); returns their manifests.

    Raises the first failure after every database was attempted (the others still complete).
    """
    names = databases or sorted(ops_config().databases)
    step = bounded(backup_database_to_store)
    return gather_backup_results(
        {name: step.submit(name) for name in names},
        flow_name="backup-database",
        subject="Database backup",
        column="database",
        blank={"backup": "", "bytes": 0, "sha256": "", "tables": 0},
        columns=lambda manifest: {
            "backup": manifest["backup_id"],
            "bytes": manifest["size"],
            "sha256": manifest["sha256"][:16],
            "tables": len(manifest["table_row_counts"]),
        },
        description="Database backups of this run",
    )
