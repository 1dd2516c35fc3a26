"""The only way values reach a shell: validate names and paths, quote everything else.

A value is either checked against a strict pattern (``validate_name``, ``validate_path``) or
quoted with :func:`shlex.quote` (``quote``, ``join``, ``render_command``). Every refusal raises
:class:`~kmpops.errors.UnsafeValueError` naming what the value is for and its ``repr``.
"""

from __future__ import annotations

import os
import re
import shlex
import string
from collections.abc import Mapping, Sequence

from kmpops.errors import UnsafeValueError

__all__ = [
    "check_command_template",
    "join",
    "quote",
    "render_argv",
    "render_command",
    "validate_absolute_path",
    "validate_name",
    "validate_path",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A path segment: safe characters only, never starting with "-" (it would read as an option).
_SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9._+@,=:%][A-Za-z0-9._+@,=:%-]*")
_MAX_PATH = 4096


def validate_name(value: str, *, what: str) -> str:
    """Return ``value`` if it is a safe name (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``).

    Raises UnsafeValueError naming ``what`` and the value otherwise. Names pass through a shell
    unchanged, but callers still quote them.
    """
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise UnsafeValueError(
            f"{what}: {value!r} is not a safe name "
            "(letters, digits, '.', '_', '-'; starting with a letter or digit; at most 128)"
        )
    return value


def validate_path(value: str, *, what: str) -> str:
    """Return ``value`` if it is an absolute or relative path of safe characters.

    Refused (UnsafeValueError naming ``what``): empty, non-string, NUL or newline, ``..``
    segments, characters outside ``A-Za-z0-9._+@,=:%-/``, a segment starting with ``-``,
    longer than 4096 characters. ``.`` segments and repeated ``/`` are allowed.
    """
    if not isinstance(value, str) or not value:
        raise UnsafeValueError(f"{what}: {value!r} is not a path")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise UnsafeValueError(f"{what}: {value!r} contains a NUL or newline")
    if len(value) > _MAX_PATH:
        raise UnsafeValueError(f"{what}: path is longer than {_MAX_PATH} characters")
    for segment in value.split("/"):
        if segment == "..":
            raise UnsafeValueError(f"{what}: {value!r} contains a '..' segment")
        if segment and not _SEGMENT_PATTERN.fullmatch(segment):
            raise UnsafeValueError(
                f"{what}: {value!r} is not a safe path "
                "(letters, digits, '._+@,=:%-' and '/'; no segment starting with '-')"
            )
    return value


def validate_absolute_path(value: str, *, what: str) -> str:
    """Return ``value`` if it is a safe path (:func:`validate_path`) that starts with ``/``.

    Raises UnsafeValueError naming ``what`` otherwise (a relative path, or anything
    :func:`validate_path` refuses, such as a leading ``-`` that a command would read as an option).
    """
    validate_path(value, what=what)
    if not value.startswith("/"):
        raise UnsafeValueError(f"{what}: {value!r} is not an absolute path")
    return value


def quote(value: str | int | os.PathLike[str]) -> str:
    """Return ``value`` quoted for a POSIX shell (``shlex.quote``); ints and paths become text.

    Raises UnsafeValueError for a NUL byte (no shell can carry it) or an unsupported type.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | os.PathLike):
        raise UnsafeValueError(f"cannot quote a {type(value).__name__} for a shell: {value!r}")
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if "\x00" in text:
        raise UnsafeValueError(f"{text!r} contains a NUL byte")
    return shlex.quote(text)


def join(argv: Sequence[str | int | os.PathLike[str]]) -> str:
    """Return ``argv`` as one shell command line, every word quoted (like ``shlex.join``)."""
    if isinstance(argv, str | bytes):
        raise UnsafeValueError("join() takes a sequence of words, not a string")
    if not argv:
        raise UnsafeValueError("join() needs at least one word")
    return " ".join(quote(word) for word in argv)


def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """``(literal, placeholder)`` pairs of a command template, placeholders checked.

    Raises UnsafeValueError for malformed braces, a positional ``{}``, attribute/index access,
    a conversion or format spec, or a placeholder inside quotes or after a backslash.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UnsafeValueError(f"command template {template!r} is malformed: {exc}") from exc
    pairs: list[tuple[str, str | None]] = []
    # Quoting contexts, innermost last: "'" and '"' quote; "$(" , "(" and "`" start a fresh
    # unquoted context (a command substitution or subshell), even inside double quotes.
    stack: list[str] = []
    escaped = False
    for literal, field, spec, conversion in parsed:
        i = 0
        while i < len(literal):
            ch, top = literal[i], stack[-1] if stack else ""
            nxt = literal[i + 1] if i + 1 < len(literal) else ""
            if escaped:
                escaped = False
            elif top == "'":
                if ch == "'":
                    stack.pop()
            elif ch == "\\":
                escaped = True
            elif ch == "$" and nxt == "(":
                stack.append("$(")
                i += 1
            elif ch == "`":
                if top == "`":
                    stack.pop()
                else:
                    stack.append("`")
            elif top == '"':
                if ch == '"':
                    stack.pop()
            elif ch in "'\"":
                stack.append(ch)
            elif ch == "(":
                stack.append("(")
            elif ch == ")" and top in ("$(", "("):
                stack.pop()
            i += 1
        context = stack[-1] if stack and stack[-1] in ("'", '"') else ""
        pairs.append((literal, field))
        if field is None:
            continue
        if not field or not field.isidentifier():
            raise UnsafeValueError(f"command template placeholder {{{field}}} is not a plain name")
        if spec or conversion:
            raise UnsafeValueError(
                f"command template placeholder {{{field}}} must not have a format spec "
                "or conversion"
            )
        if context or escaped:
            where = "after a backslash" if escaped else f"inside {context} quotes"
            # A quoted value inside quotes turns the quoting inside out: in sh -c 'echo {x}'
            # the value's own quotes close the template's, and x = "a; id" runs id.
            raise UnsafeValueError(
                f"command template {template!r}: placeholder {{{field}}} is {where}; a "
                "placeholder must stand unquoted (its value is quoted for you). To hand a value "
                "to an inner shell pass it as an argument: sh -c 'echo \"$1\"' sh {" + field + "}"
            )
    return pairs


def check_command_template(template: str) -> list[str]:
    """Check a command template without values; return its placeholder names (in order).

    For config validation. Raises UnsafeValueError as :func:`render_command` would for the
    template itself (malformed braces, a placeholder that is not a plain name, has a spec or
    conversion, or stands inside quotes or after a backslash).
    """
    return [field for _literal, field in _parse_template(template) if field is not None]


def render_command(template: str, values: Mapping[str, str | int]) -> str:
    """Fill ``{name}`` placeholders of ``template`` with shell-quoted ``values``.

    The template is code (trusted); only the values are data. ``{{``/``}}`` are literal braces.
    A placeholder must be an unquoted word or part of one (``{deploy_path}/current``): inside
    ``'...'`` or ``"..."`` or after ``\\`` its quoted value would break out of the template's
    quotes, so such a template is refused. Raises UnsafeValueError naming the placeholder for
    that, an unknown name, a positional ``{}``, attribute/index access, a conversion or format
    spec, or a value that cannot be quoted.
    """
    parts: list[str] = []
    for literal, field in _parse_template(template):
        parts.append(literal)
        if field is None:
            continue
        if field not in values:
            raise UnsafeValueError(f"command template placeholder {{{field}}} has no value")
        parts.append(quote(values[field]))
    return "".join(parts)


# A word of a command run without a shell (through sudo): placeholders and these characters only.
_ARGV_LITERAL = re.compile(r"[A-Za-z0-9._+@%/=:,-]*")


def render_argv(template: str, values: Mapping[str, str | int]) -> list[str]:
    """The words of a simple command template with ``{name}`` placeholders filled in.

    For commands that run without a shell in between (``sudo -n -- argv``), where a sudo rule
    must match the exact words: the template is split on whitespace, and each word may hold only
    letters, digits, ``._+@%/=:,-`` and placeholders (no quotes, ``$``, backslashes, globs,
    ``;``, ``&&``, ``|`` or redirections, which would need a shell). A value is one word (it is
    never split) and may not contain a NUL or newline. Raises UnsafeValueError naming the
    template and the offending word or placeholder.
    """
    words = template.split()
    if not words:
        raise UnsafeValueError(f"command template {template!r} is empty")
    argv: list[str] = []
    for word in words:
        parts: list[str] = []
        try:
            parsed = list(string.Formatter().parse(word))
        except ValueError as exc:
            raise UnsafeValueError(f"command template {template!r} is malformed: {exc}") from exc
        for literal, field, spec, conversion in parsed:
            if not _ARGV_LITERAL.fullmatch(literal):
                raise UnsafeValueError(
                    f"command {template!r}: {word!r} needs a shell (quotes, $, globs, ;, |, "
                    "redirections); a command run through sudo must be one simple command of "
                    "plain words"
                )
            parts.append(literal)
            if field is None:
                continue
            if not field or not field.isidentifier() or spec or conversion:
                raise UnsafeValueError(
                    f"command template placeholder {{{field}}} is not a plain name"
                )
            if field not in values:
                raise UnsafeValueError(f"command template placeholder {{{field}}} has no value")
            value = str(values[field])
            if any(ch in value for ch in "\x00\n\r"):
                raise UnsafeValueError(f"{{{field}}}: {value!r} contains a NUL or newline")
            parts.append(value)
        argv.append("".join(parts))
    return argv
