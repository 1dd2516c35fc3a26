"""The exception hierarchy of kmp-ops.

Tasks retry only on :class:`TransientError`; everything else is a decision, not an accident.
"""

from __future__ import annotations

from typing import Any

from kmpops.redact import redact


class KmpOpsError(Exception):
    """Base class of every error kmp-ops raises on purpose.

    Its text passes through the process-wide redactor (:mod:`kmpops.redact`) when the error is
    made and again when it is printed, so a secret that slipped into a message never reaches a
    Prefect state message, a log line, a pickled result or an artifact.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    def __str__(self) -> str:
        return redact(super().__str__())


class ConfigError(KmpOpsError):
    """An invalid configuration; ``problems`` holds one ``field.path: message`` line per problem."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.problems))
        self.problems = [redact(p) for p in self.problems]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.source))


class UnsafeValueError(KmpOpsError, ValueError):
    """A value that would reach a shell or a path is not acceptable."""


class ConnectorError(KmpOpsError):
    """Something outside kmp-ops (a host, a store, a database) did not do what was asked."""


class TransientError(ConnectorError):
    """A failure worth retrying: network, timeouts, 5xx, throttling."""


class HostUnreachable(TransientError):
    """TCP connect or SSH handshake to a host failed."""


class CommandTimeout(TransientError):
    """A remote command ran past its timeout."""


class StorageUnavailable(TransientError):
    """The object store endpoint is down or answered with a server error."""


class HostKeyRejected(ConnectorError):
    """The host's key is unknown or changed; never retried."""


class AuthenticationFailed(ConnectorError):
    """The host refused our key."""


class PrivilegeRefused(ConnectorError):
    """``sudo -n`` refused a command (no rule lets the login user run it without a password);
    the message names the host, the command and the user it was to run as. Never retried."""


class CommandFailed(ConnectorError):
    """A command exited with a non-zero status; ``result`` holds its output."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class IntegrityError(KmpOpsError):
    """A checksum or size does not match what was recorded; never retried."""


class PolicyViolation(KmpOpsError):
    """A policy refused the action: a freeze window, a refused approval, a failed gate."""


class NotFound(KmpOpsError):
    """A named thing (backup, release, host, object) does not exist."""


class Unsupported(KmpOpsError):
    """The operation is not offered for this kind of target (named in the message)."""
