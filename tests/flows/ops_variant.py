"""A shared helper for flow tests that run against a mutated copy of the stack's ops.yaml."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def sudo_rules(config: Path) -> Iterator[Path]:
    """Install the sudo rules ``kmpops sudoers ENV`` prints for every environment of the ops.yaml
    at ``config`` — what an operator does after adding a service whose restart runs as root —
    as a sudoers file of its own (validated with ``visudo -cf``); yields its path and removes
    it on exit. The session stack's own rules cover only the services of its ops.yaml."""
    from kmpops.become import sudoers_rules
    from kmpops.config import load_config
    from kmpops.stack.deploy_user import install_sudoers, remove_sudoers

    cfg = load_config(config)
    text = "\n".join(sudoers_rules(cfg, env) for env in cfg.environments) + "\n"
    installed = install_sudoers(config.parent, text)
    try:
        yield installed
    finally:
        remove_sudoers(config.parent)


def config_variant(cfg: Any, changes: dict[str, Any]) -> Any:
    """A copy of the validated config ``cfg`` with ``changes`` applied — no YAML written:
    ``{"environments.production.policy.approval_required": False}`` (dotted paths through
    models and mappings; a value ``DROP`` removes a mapping's key). Hand it to a run with
    ``tasks.context.config_override``. The copy is not validated again: change only what
    stays valid."""
    for dotted, value in changes.items():
        cfg = _replace(cfg, dotted.split("."), value)
    return cfg


DROP = object()


def _replace(obj: Any, parts: list[str], value: Any) -> Any:
    head, rest = parts[0], parts[1:]
    if isinstance(obj, dict):
        if not rest and value is DROP:
            return {k: v for k, v in obj.items() if k != head}
        return {**obj, head: _replace(obj[head], rest, value) if rest else value}
    new = _replace(getattr(obj, head), rest, value) if rest else value
    return obj.model_copy(update={head: new})


def first_install(config: Path, version: str = "1.0.0") -> dict[str, Any]:
    """``version`` of the web service on every host of ``config``: a first install through
    deploy-pipeline (requested by dave, bake 0), with ``KMPOPS_CONFIG`` pointing at ``config``
    for the run only. Returns the pipeline's result; fails the test unless it deployed."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    old = os.environ["KMPOPS_CONFIG"]
    os.environ["KMPOPS_CONFIG"] = str(config)
    try:
        result = deploy_pipeline(
            DeployRequest(
                service="web",
                version=version,
                allow_first_install=True,
                bake_seconds=0,
                requested_by="dave",
            )
        )
    finally:
        os.environ["KMPOPS_CONFIG"] = old
    assert result["status"] == "deployed", result
    return result
