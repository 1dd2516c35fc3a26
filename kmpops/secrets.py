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


def write_secret_file(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o600
) -> None:
    """Write a secret (token, key, password) to ``path`` so that it is never readable by others.

    The data goes to a new temporary file beside ``path`` that is *created* with ``mode``
    (``os.open`` with ``O_CREAT | O_EXCL``, so it never exists with wider permissions, even for
    an instant, whatever the umask), is flushed to disk, then renamed over ``path`` (atomic: a
    reader sees the old file or the new one). An existing ``path`` keeps neither its content
    nor its mode. Raises OSError (the temporary file is removed; ``path`` is unchanged).
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may only have narrowed it; be exact
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
