"""The suite runs from a clone with nothing beside it: no test names a path outside the repo."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the repo's parent, parents[3] and up, the shared folder beside the clone, the guide's seed:
# ways a test reaches past the clone (the pattern is assembled so this file does not match it)
SHARED = "sha" + "red"
OUTSIDE = re.compile(
    r"REPO\.parent\b|parents\[[3-9]\]|\.\./" + SHARED + "|/work/" + SHARED + "|seed/operations"
)


def test_no_test_reads_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        if path.name != Path(__file__).name
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []


def test_the_guide_blocks_fixture_is_in_the_repository() -> None:
    text = (REPO / "tests" / "fixtures" / "guide-blocks.md").read_text()
    assert "alerts:\n  high_cpu:" in text and "backups:\n  database:" in text
