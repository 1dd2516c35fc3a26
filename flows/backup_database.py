"""``backup-database``: the guide's daily full database backup (``backups.database``).

Each configured database (or the ones named) is dumped straight into the object store by one
task; the catalog marks a backup complete only after its upload was confirmed. A table artifact
lists what was backed up; a failure notifies at critical severity and fails the run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.backup import backup_database_to_store
from tasks.common import notify, ops_config


@flow(name="backup-database", log_prints=False)
def backup_database(databases: list[str] | None = None) -> list[dict[str, Any]]:
    """Back up ``databases`` (default: every database in ops.yaml); returns their manifests.

    Raises the first failure after every database was attempted (the others still complete).
    """
    names = databases or sorted(ops_config().databases)
    futures = {name: backup_database_to_store.submit(name) for name in names}
    done: list[dict[str, Any]] = []
    failures: list[tuple[str, Exception]] = []
    rows = []
    for name, future in futures.items():
        try:
            manifest = future.result()
        except Exception as exc:  # collect, report, re-raise below
            failures.append((name, exc))
            rows.append(
                {
                    "database": name,
                    "result": f"FAILED: {type(exc).__name__}",
                    "backup": "",
                    "bytes": 0,
                    "sha256": "",
                    "tables": 0,
                }
            )
            continue
        done.append(manifest)
        rows.append(
            {
                "database": name,
                "result": "complete",
                "backup": manifest["backup_id"],
                "bytes": manifest["size"],
                "sha256": manifest["sha256"][:16],
                "tables": len(manifest["table_row_counts"]),
            }
        )
    create_table_artifact(
        key="backup-database", table=rows, description="Database backups of this run"
    )
    if failures:
        names_failed = ", ".join(n for n, _ in failures)
        notify(
            "critical",
            f"Database backup failed: {names_failed}",
            "\n".join(f"- {n}: {type(e).__name__}: {e}" for n, e in failures),
            dedup_key=f"backup-database:{names_failed}",
        )
        raise failures[0][1]
    return done
