"""A shared helper for flow tests that run against a mutated copy of the stack's ops.yaml."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml


def ops_yaml_variant(
    stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Callable[[dict], None]], Path]:
    """Return ``apply(mutate)``: copy the stack's ops.yaml, let ``mutate(data)`` change it in
    place, write it to ``tmp_path/ops.yaml``, point KMPOPS_CONFIG at it and return its path.
    """

    def apply(mutate: Callable[[dict], None]) -> Path:
        data = yaml.safe_load(Path(stack.ops_yaml).read_text())
        mutate(data)
        path = tmp_path / "ops.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        monkeypatch.setenv("KMPOPS_CONFIG", str(path))
        return path

    return apply
