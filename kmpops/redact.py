"""Mask secrets in text and in log records before they leave the process.

Prefect does not redact anything it ships to its API, so kmp-ops does: :class:`Redactor` masks
known secret values (registered with :meth:`Redactor.add`) and secret-looking patterns (AWS keys,
private key blocks, passwords in URLs, ``password=...`` pairs); :class:`RedactingFilter` applies it
to :class:`logging.LogRecord` objects; :func:`install` puts the filter on Prefect's loggers *and* on
their handlers (Prefect's ``APILogHandler`` formats the record in ``emit``, after handler filters
ran), plus a log-record factory so records created on any logger are masked at birth.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "MASK",
    "RedactingFilter",
    "Redactor",
    "get_redactor",
    "install",
    "redact",
]

MASK = "***"
MIN_SECRET_LENGTH = 4

_KEY_WORDS = r"(?:password|passwd|passphrase|secret|token|api[_-]?key|apikey|private[_-]?key)"

# Order matters: whole blocks first, then the narrower shapes.
_PRIVATE_KEY_BLOCK = re.compile(
    r"(-----BEGIN (?P<kind>[A-Z0-9 ]*?)PRIVATE KEY-----)"
    r"(?:.*?(-----END (?P=kind)PRIVATE KEY-----)|.*\Z)",
    re.DOTALL,
)
_AWS_SECRET_KEY = re.compile(
    r"(?i)(?P<key>(?:aws[_-]?)?secret[_ -]?(?:access[_ -]?)?key(?:[_-]?id)?|SecretAccessKey"
    r"|aws[_-]?secret)(?P<sep>[\"']?\s{0,8}[:=]\s{0,8}[\"']?|\s{1,8})(?P<val>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"
)
_AWS_ACCESS_KEY_ID = re.compile(
    r"\b(?P<prefix>AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}\b"
)
# Every repetition is bounded: an unbounded run before a keyword made a 13 kB base64 blob take
# a minute (quadratic backtracking). The key's own prefix ("db_", "client_") is left untouched.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s:/@]{1,128}):(?P<password>[^\s@]{1,256})@(?=[^\s@])"
)
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>" + _KEY_WORDS + r"[A-Za-z0-9_.-]{0,64})"
    r"(?P<sep>[\"']?[ \t]{0,8}[=:][ \t]{0,8})"
    r"(?P<val>\"[^\"\n]{0,512}\"?|'[^'\n]{0,512}'?|[^\s&,;\"'<>)\]}]{1,512})"
)


def _mask_block(match: re.Match[str]) -> str:
    kind = match.group("kind")
    return f"-----BEGIN {kind}PRIVATE KEY-----{MASK}-----END {kind}PRIVATE KEY-----"


def _mask_aws_secret(match: re.Match[str]) -> str:
    return f"{match.group('key')}{match.group('sep')}{MASK}"


def _mask_access_key_id(match: re.Match[str]) -> str:
    return f"{match.group('prefix')}{MASK}"


def _mask_url_password(match: re.Match[str]) -> str:
    password = match.group("password")
    # "http://host:8080/path@x" is a port, not a password.
    if re.fullmatch(r"\d+(?:/.*)?", password):
        return match.group(0)
    return f"{match.group('head')}:{MASK}@"


def _mask_key_value(match: re.Match[str]) -> str:
    value = match.group("val")
    if value.strip("\"'") in ("", MASK):
        return match.group(0)
    quote = value[0] if value[0] in "\"'" and len(value) > 1 else ""
    return f"{match.group('key')}{match.group('sep')}{quote}{MASK}{quote}"


_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (_PRIVATE_KEY_BLOCK, _mask_block),
    (_AWS_SECRET_KEY, _mask_aws_secret),
    (_AWS_ACCESS_KEY_ID, _mask_access_key_id),
    (_URL_PASSWORD, _mask_url_password),
    (_KEY_VALUE, _mask_key_value),
)


class Redactor:
    """Masks known secret values and secret-looking patterns in text. Thread-safe.

    Known values are masked first (longest first, also in their URL-encoded form), so a secret is
    never left half-visible by a pattern that matched only part of it.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._known: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Register a secret value; values shorter than 4 characters are ignored (too common)."""
        if not isinstance(secret, str):
            secret = str(secret)
        secret = secret.strip()
        if len(secret) < MIN_SECRET_LENGTH:
            return
        variants = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
        with self._lock:
            if variants <= self._secrets:
                return
            self._secrets |= variants
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._known = re.compile("|".join(re.escape(s) for s in ordered))

    def clear(self) -> None:
        """Forget every registered secret value (tests)."""
        with self._lock:
            self._secrets.clear()
            self._known = None

    def redact(self, text: str) -> str:
        """Return ``text`` with known secrets and secret-looking patterns replaced by ``***``."""
        if not text:
            return text
        known = self._known
        if known is not None:
            text = known.sub(MASK, text)
        for pattern, mask in _PATTERNS:
            text = pattern.sub(mask, text)
        return text


_default = Redactor()


def get_redactor() -> Redactor:
    """The process-wide redactor used by :class:`RedactingFilter` and the connectors."""
    return _default


def redact(text: str) -> str:
    """Shorthand for ``get_redactor().redact(text)``."""
    return _default.redact(text)


def _redact_record(record: logging.LogRecord, redactor: Redactor) -> None:
    """Format the record's message, redact it and drop ``args``; redact exception and stack text."""
    try:
        message = record.getMessage()
    except Exception:
        message = f"{record.msg!s} {record.args!r}"
    record.msg = redactor.redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redactor.redact(record.exc_text)
        # Handlers that render exc_info themselves (rich tracebacks) would show the raw exception.
        record.exc_info = None
    if record.stack_info:
        record.stack_info = redactor.redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in a record; it never drops a record.

    The message is formatted first (``msg % args``), redacted, then stored in ``msg`` with
    ``args`` cleared, so every later formatter sees only the masked text.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor

    @property
    def redactor(self) -> Redactor:
        return self._redactor if self._redactor is not None else get_redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record, self.redactor)
        return True


DEFAULT_LOGGERS: tuple[str, ...] = (
    "prefect",
    "prefect.flow_runs",
    "prefect.task_runs",
    "prefect.extra",
    "prefect.workers",
    "kmpops",
    "root",
)

_install_lock = threading.Lock()
_factory_installed = False


def _get_logger(name: str) -> logging.Logger:
    return logging.getLogger() if name in ("root", "") else logging.getLogger(name)


def _has_filter(filterer: logging.Filterer) -> bool:
    return any(isinstance(f, RedactingFilter) for f in filterer.filters)


def install(
    logger_names: Sequence[str] = DEFAULT_LOGGERS,
    *,
    record_factory: bool = True,
) -> None:
    """Add a :class:`RedactingFilter` to the named loggers and to every handler attached to them.

    Idempotent: a logger or handler that already has one is left alone, so calling it again after
    Prefect (re)configured logging covers the new handlers. Logger filters only see records logged
    on that logger, handler filters see propagated ones too; with ``record_factory`` every record
    created in the process is also masked at creation, whatever handlers exist later. Call it after
    ``import prefect`` (which configures logging) in every process that runs flows.
    """
    global _factory_installed
    with _install_lock:
        for name in logger_names:
            logger = _get_logger(name)
            if not _has_filter(logger):
                logger.addFilter(RedactingFilter())
            for handler in logger.handlers:
                if not _has_filter(handler):
                    handler.addFilter(RedactingFilter())
        if record_factory and not _factory_installed:
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                _redact_record(record, get_redactor())
                return record

            logging.setLogRecordFactory(factory)
            _factory_installed = True
