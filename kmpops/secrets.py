"""Resolve secret references at run time: ``env:NAME``, ``file:/path``, ``prefect:block``, literal.

Resolution happens inside tasks, never at import time; every resolved value is registered with the
log redactor so it cannot reach a log line. Prefect blocks are resolved by a loader the task layer
injects (kmpops itself does not import Prefect).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kmpops.config import SecretRef
from kmpops.errors import ConfigError

BlockLoader = Callable[[str], str]


def resolve_secret(ref: SecretRef | str, *, block_loader: BlockLoader | None = None) -> str:
    """Return the secret's value; raise ConfigError naming the reference (never the value)."""
    if isinstance(ref, str):
        ref = SecretRef.parse(ref)
    if ref.scheme == "literal":
        assert ref.literal is not None
        value = ref.literal.get_secret_value()
    elif ref.scheme == "env":
        if ref.target not in os.environ:
            raise ConfigError([f"secret env:{ref.target}: environment variable is not set"])
        value = os.environ[ref.target]
    elif ref.scheme == "file":
        try:
            value = Path(ref.target).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError([f"secret file:{ref.target}: {err.strerror}"]) from None
    else:
        if block_loader is None:
            raise ConfigError([f"secret prefect:{ref.target}: no Prefect block loader available"])
        value = block_loader(ref.target)
    _register(value)
    return value


def _register(value: str) -> None:
    try:
        from kmpops.redact import get_redactor
    except ImportError:  # the redactor module is optional for plain library use
        return
    get_redactor().add(value)
