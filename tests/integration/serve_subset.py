"""Serve some of the real deployments of ``deployments.serve.build()`` (test helper, not a test).

    python tests/integration/serve_subset.py backup-configuration backup-database

Run from the repository root with ``PREFECT_API_URL`` and ``KMPOPS_CONFIG`` set. Exactly the
runner deployments the production entry point builds (names, schedules, triggers), filtered by
flow name; exits 2 if a name is not a served flow.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(names: list[str]) -> int:
    """Serve the deployments named ``names`` until SIGTERM."""
    from prefect import serve

    from deployments.serve import build
    from tasks.common import ops_config

    chosen = [d for d in build(ops_config()) if d.name in names]
    missing = sorted(set(names) - {d.name for d in chosen})
    if missing:
        print(f"not served flows: {', '.join(missing)}", file=sys.stderr)
        return 2
    serve(*chosen, print_starting_message=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
