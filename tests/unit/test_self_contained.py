"""The suite runs from a clone with nothing beside it: no test names a path outside the repo."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# REPO.parent / ..., parents[3], "../shared", /work/shared: ways a test reaches past the clone
OUTSIDE = re.compile(r"REPO\.parent\b|parents\[[3-9]\]|\.\./shared|/work/shared|seed/operations")


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
