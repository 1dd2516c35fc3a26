"""Host-side release operations over one SSH connection (the Capistrano layout).

Layout under a service's ``deploy_path`` on a host::

    releases/<version>/     one directory per release, complete or absent (never half-extracted)
    current -> releases/<version>   switched atomically (symlink created aside, then renamed)
    .incoming/              uploads and extractions in progress (never pointed at)
    shared/                 state that outlives releases (run, log, config)

Every function validates the names that reach the shell (:func:`validate_version`) and quotes all
values. ``stage_release`` is idempotent (a release already staged with the same sha256 is left
alone); ``switch_current`` returns what ``current`` pointed at before, which is how a rollback
finds its way back; ``prune_releases`` never removes the current or the previous release.
Errors: UnsafeValueError (bad version/path), IntegrityError (checksum mismatch, a release
directory with other content), NotFound (release not staged), CommandFailed (restart), and the
connection's HostUnreachable / CommandTimeout (transient).
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from kmpops import shellsafe
from kmpops.become import refusal, refused_shell_command
from kmpops.errors import CommandFailed, IntegrityError, NotFound, UnsafeValueError

__all__ = [
    "HealthResult",
    "RemoteHost",
    "RestartFailed",
    "Switched",
    "activate",
    "check_health_command",
    "check_health_url",
    "current_release",
    "file_sha256",
    "list_releases",
    "prune_releases",
    "remove_current",
    "restart_service",
    "stage_release",
    "switch_current",
    "validate_version",
]

MARKER = ".kmpops-sha256"


class _Result(Protocol):
    exit_status: int
    stdout: str
    stderr: str


class RemoteHost(Protocol):
    """What release operations need of a connection (``kmpops.connectors.ssh.SSHConnection``)."""

    name: str

    def run(
        self,
        command: Sequence[str] | str,
        *,
        timeout: float = ...,
        check: bool = ...,
        stdin: bytes | IO[bytes] | None = ...,
    ) -> _Result: ...

    def put(self, local: Path | IO[bytes], remote: str, *, mode: int | None = ...) -> int: ...


def validate_version(version: str) -> str:
    """Return ``version`` if it is a safe release name (no ``..``, spaces, ``;``, ``/``...).

    Raises UnsafeValueError naming the value otherwise.
    """
    shellsafe.validate_name(version, what="release version")
    if ".." in version:
        raise UnsafeValueError(f"release version: {version!r} must not contain '..'")
    return version


def _deploy_path(deploy_path: str) -> str:
    shellsafe.validate_path(deploy_path, what="deploy path")
    if not deploy_path.startswith("/"):
        raise UnsafeValueError(f"deploy path: {deploy_path!r} must be absolute")
    return deploy_path.rstrip("/") or "/"


def file_sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_STAGE_SCRIPT = r"""
set -eu
mkdir -p "$1/releases" "$1/.incoming" "$1/shared"; cd "$1"; v=$2; sha=$3
tmp=".incoming/$v.$$"; tgz="$tmp.tar.gz"
if [ -e "$tmp" ] || [ -e "$tgz" ]; then rm -rf "$tmp" "$tgz"; fi
trap 'rm -f "$tgz"' EXIT
cat > "$tgz"
if [ -e "releases/$v" ]; then
    have=$(cat "releases/$v/{marker}" 2>/dev/null || true)
    if [ "$have" = "$sha" ]; then echo present; exit 0; fi
    echo "releases/$v exists with other content" >&2; exit 3
fi
# openssl uses the CPU's SHA extensions (2-3x coreutils' sha256sum); sha256sum otherwise.
sum=$(openssl dgst -sha256 -r "$tgz" 2>/dev/null) || sum=$(sha256sum "$tgz")
[ "${sum%% *}" = "$sha" ] || { echo checksum >&2; exit 4; }
mkdir -m 755 "$tmp"
tar -xzf "$tgz" -C "$tmp" --no-same-owner || { rm -rf "$tmp"; exit 5; }
printf '%s\n' "$sha" > "$tmp/{marker}"
mv -T "$tmp" "releases/$v"
echo staged
""".replace("{marker}", MARKER)


def stage_release(
    conn: RemoteHost,
    deploy_path: str,
    version: str,
    artifact: Path | IO[bytes],
    sha256: str,
    *,
    timeout: float = 300.0,
) -> bool:
    """Upload ``artifact`` (a .tar.gz) and extract it into ``releases/<version>``.

    One round trip: the tarball is streamed on the command's stdin into a temporary file in
    ``.incoming/``, its sha256 verified on the host, extracted into a temporary directory there
    and renamed to ``releases/<version>`` only when complete, so a crash, a lost connection or a
    short upload leaves no half-extracted release where ``current`` could point.
    Returns True if staged now, False if the same release (same sha256) was already there.
    Raises IntegrityError on a checksum mismatch or a same-named release with other content.
    Rollback: none needed (a staged release is not live; ``prune_releases`` removes it).
    """
    root = _deploy_path(deploy_path)
    validate_version(version)
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise UnsafeValueError("sha256: expected 64 lowercase hex digits")
    command = ["sh", "-c", _STAGE_SCRIPT, "stage", root, version, sha256]
    if isinstance(artifact, Path):
        with artifact.open("rb") as source:
            result = conn.run(command, timeout=timeout, stdin=source)
    else:
        result = conn.run(command, timeout=timeout, stdin=artifact)
    if result.exit_status in (3, 4):
        what = "checksum mismatch" if result.exit_status == 4 else "exists with other content"
        raise IntegrityError(f"host {conn.name}: release {version}: {what}")
    if result.exit_status != 0:
        raise CommandFailed(
            f"host {conn.name}: staging release {version} failed "
            f"(exit {result.exit_status}): {result.stderr.strip()[-300:]}",
            result,
        )
    return result.stdout.strip().endswith("staged")


def _release_of(link_target: str) -> str | None:
    target = link_target.strip().rstrip("/")
    return target.rsplit("/", 1)[-1] if target else None


def current_release(conn: RemoteHost, deploy_path: str) -> str | None:
    """The release ``current`` points at, or None if there is no ``current``."""
    root = _deploy_path(deploy_path)
    result = conn.run(["readlink", f"{root}/current"], timeout=30)
    return _release_of(result.stdout) if result.exit_status == 0 else None


# prune <deploy_path> <keep> [protected...]: remove releases beyond the <keep> newest (mtime),
# never current, a protected one, or a name that is not a release name; prints removed=<name>.
# Clears .incoming leftovers older than an hour. Exit 1 if a removal failed. Runs in a subshell.
_PRUNE_FN = r"""
prune() (
    cd "$1" 2>/dev/null || exit 0
    keep=$2; shift 2
    for f in .incoming/* .incoming/.[!.]*; do  # find only if something is there
        [ -e "$f" ] || continue
        find .incoming -mindepth 1 -maxdepth 1 -mmin +60 -exec rm -rf {} +; break
    done
    cur=$(readlink current 2>/dev/null || true); cur=${cur%/}; cur=${cur##*/}
    cd releases 2>/dev/null || exit 0
    ls -1t | {
        n=0; rc=0
        while IFS= read -r r; do
            n=$((n + 1))
            [ "$n" -gt "$keep" ] && [ "$r" != "$cur" ] || continue
            for p in "$@"; do [ "$r" = "$p" ] && continue 2; done
            case $r in [!A-Za-z0-9]*|*..*|*[!A-Za-z0-9._-]*) echo "skipped=$r"; continue ;; esac
            if rm -rf -- "$r"; then echo "removed=$r"; else rc=1; fi
        done
        exit $rc
    }
)
"""

_SWITCH_SCRIPT = (
    _PRUNE_FN
    + r"""
set -eu
home=$(pwd); cd "$1"; v=$2
[ -d "releases/$v" ] || { echo "releases/$v is not staged" >&2; exit 6; }
prev=$(readlink current 2>/dev/null || true)
tmp=".current.$$"
ln -sfn "releases/$v" "$tmp"
mv -T "$tmp" current
echo "prev=$prev"
[ $# -ge 3 ] || exit 0
cd "$home"
if "${SHELL:-/bin/sh}" -c "$3"; then :; else
    rc=$?; echo "restart exited $rc" >&2; exit 7
fi
[ $# -ge 5 ] || exit 0
if out=$(timeout "$5" "${SHELL:-/bin/sh}" -c "$4" 2>&1 </dev/null); then rc=0; else rc=$?; fi
printf '%s\n%s\n' "health-probe=$rc" "$out"
[ "$rc" = 0 ] && [ $# -ge 6 ] || exit 0
root=$1; keep=$6; shift 6
echo "prune:"
prune "$root" "$keep" "${prev##*/}" "$@" || echo "pruning failed" >&2
"""
)
_PROBE = "health-probe="


class RestartFailed(CommandFailed):
    """``current`` was switched but the restart command failed; ``previous`` is what
    ``current`` pointed at before (what a rollback switches back to)."""

    def __init__(self, message: str, result: object, previous: str | None) -> None:
        super().__init__(message, result)
        self.previous = previous

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), None, self.previous))


@dataclass(frozen=True)
class Switched:
    """What :func:`activate` did: the release ``current`` pointed at before (None: first
    install), the first health probe's verdict (None when no probe was asked for), and the
    releases pruned after a healthy probe."""

    previous: str | None
    probe: tuple[bool, str] | None = None
    pruned: tuple[str, ...] = ()


def switch_current(
    conn: RemoteHost,
    deploy_path: str,
    version: str,
    *,
    restart: str | None = None,
    restart_timeout: float = 60.0,
) -> str | None:
    """Point ``current`` at ``releases/<version>`` atomically; return the previous release.

    The new link is created beside ``current`` and renamed over it (rename(2) is atomic), so
    ``current`` always names a complete release. With ``restart`` (a command rendered by
    ``shellsafe.render_command``), the service is restarted in the same round trip, right
    after the switch, by the login shell in the session's directory (as a separate command
    would be). Raises NotFound if the release is not staged (nothing changed), RestartFailed
    (switched; carries ``previous``) if the restart exits non-zero.
    Rollback: ``switch_current(conn, deploy_path, previous)`` (or ``remove_current`` when the
    previous release is None, i.e. a first install).
    """
    return activate(
        conn, deploy_path, version, restart=restart, restart_timeout=restart_timeout
    ).previous


def activate(
    conn: RemoteHost,
    deploy_path: str,
    version: str,
    *,
    restart: str | None = None,
    restart_timeout: float = 60.0,
    health: str | None = None,
    health_timeout: float = 5.0,
    prune_keep: int | None = None,
    protect: Sequence[str | None] = (),
) -> Switched:
    """:func:`switch_current`, then, if ``restart`` succeeded and ``health`` (a rendered health
    command) is given, its first probe, and if that is healthy and ``prune_keep`` is given,
    :func:`prune_releases` (``protect`` plus the previous release), all in one round trip.

    The probe runs like :func:`check_health_command`'s: the login shell, ``health_timeout``
    seconds at most (exit 124 past it), its verdict and last output line in ``probe``; an
    unhealthy probe is not an error here (the caller retries or rolls back, and nothing was
    pruned). A failed removal is not an error either (it is missing from ``pruned``). Raises
    as :func:`switch_current` does, ValueError for inconsistent options (nothing changed).
    Rollback: as for :func:`switch_current` (pruned releases were neither current nor previous).
    """
    root = _deploy_path(deploy_path)
    validate_version(version)
    if health is not None and (restart is None or not 0 < health_timeout <= 3600):
        raise ValueError("a health probe needs a restart command and 0 < health_timeout <= 3600")
    if prune_keep is not None and (health is None or prune_keep < 1):
        raise ValueError("pruning needs a health probe and prune_keep >= 1")
    kept = [validate_version(p) for p in protect if p]
    command = ["sh", "-c", _SWITCH_SCRIPT, "switch", root, version]
    if restart is not None:
        command.append(restart)
        if health is not None:
            command += [health, f"{health_timeout:g}"]
            if prune_keep is not None:
                command += [str(prune_keep), *kept]
    budget = 30 + (restart_timeout if restart is not None else 0)
    result = conn.run(command, timeout=budget + (health_timeout if health else 0))
    if result.exit_status == 6:
        raise NotFound(f"host {conn.name}: release {version} is not staged in {root}")
    lines = result.stdout.splitlines()
    marker = next((line for line in lines if line.startswith("prev=")), None)
    if marker is None or (result.exit_status != 0 and result.exit_status != 7):
        raise CommandFailed(
            f"host {conn.name}: switching to {version} failed: {result.stderr.strip()[-300:]}",
            result,
        )
    previous = _release_of(marker.removeprefix("prev="))
    if result.exit_status == 7:
        # stderr ends with our "restart exited N"; the restart's own output is above it, or on
        # stdout after the prev= line.
        err = result.stderr.strip().splitlines()
        own = err[:-1] or lines[lines.index(marker) + 1 :]
        tail = " ".join(x.strip() for x in [*own[-5:], *err[-1:]] if x.strip())[-300:]
        why = refusal(result.stderr)
        if why is not None:  # sudo -n said no: name the command, not only sudo's words
            tail = str(refused_shell_command(conn.name, str(restart), why)).split(": ", 1)[1]
        raise RestartFailed(
            f"host {conn.name}: restart failed after switching to {version}: {tail}",
            result,
            previous,
        )
    probe, pruned = None, ()
    if health is not None:
        at = next((i for i, line in enumerate(lines) if line.startswith(_PROBE)), None)
        if at is None:
            raise CommandFailed(f"host {conn.name}: no health probe after switching", result)
        code = lines[at].removeprefix(_PROBE)
        end = lines.index("prune:", at) if "prune:" in lines[at:] else len(lines)
        pruned = tuple(x[8:] for x in lines[end + 1 :] if x.startswith("removed="))
        out = [x.strip() for x in lines[at + 1 : end] if x.strip()]
        detail = f"timed out after {health_timeout:g}s" if code == "124" else f"exit {code}"
        if out:
            detail += f": {out[-1][:200]}"
        probe = (code == "0", detail)
    return Switched(previous, probe, pruned)


def remove_current(conn: RemoteHost, deploy_path: str) -> None:
    """Remove ``current`` (rollback of a first install). Idempotent."""
    root = _deploy_path(deploy_path)
    conn.run(["rm", "-f", f"{root}/current"], timeout=30, check=True)


def restart_service(conn: RemoteHost, command: str, *, timeout: float = 60.0) -> str:
    """Run the service's rendered restart ``command`` (from ``shellsafe.render_command``).

    Returns its output; raises CommandFailed (with the output tail) on a non-zero exit.
    """
    result = conn.run(command, timeout=timeout)
    if result.exit_status != 0:
        tail = (result.stderr or result.stdout).strip()[-300:]
        why = refusal(result.stderr)
        if why is not None:
            tail = str(refused_shell_command(conn.name, command, why)).split(": ", 1)[1]
        raise CommandFailed(
            f"host {conn.name}: restart failed (exit {result.exit_status}): {tail}", result
        )
    return result.stdout.strip()


@dataclass(frozen=True)
class HealthResult:
    """A health check's verdict: attempts made, last status/output, seconds spent."""

    healthy: bool
    attempts: int
    detail: str
    seconds: float


def _retry(
    probe: Callable[[], tuple[bool, str]],
    retries: int,
    interval: float,
    sleep: Callable[[float], None],
) -> HealthResult:
    started = time.monotonic()
    detail = ""
    for attempt in range(1, retries + 1):
        ok, detail = probe()
        if ok:
            return HealthResult(True, attempt, detail, time.monotonic() - started)
        if attempt < retries:
            sleep(interval)
    return HealthResult(False, retries, detail, time.monotonic() - started)


def check_health_url(
    url: str,
    *,
    retries: int = 10,
    interval: float = 0.5,
    timeout: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """GET ``url`` until it answers 200, at most ``retries`` times ``interval`` s apart.

    Never raises for an unhealthy service: the verdict is in the result.
    """
    if not url.startswith(("http://", "https://")):
        raise UnsafeValueError(f"health check URL {url!r} must be http(s)")

    def probe() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                return response.status == 200, f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return False, f"HTTP {exc.code}"
        except OSError as exc:
            return False, f"no answer: {getattr(exc, 'reason', exc)}"

    return _retry(probe, retries, interval, sleep)


def check_health_command(
    conn: RemoteHost,
    command: str,
    *,
    retries: int = 10,
    interval: float = 0.5,
    timeout: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """Run the rendered health ``command`` on the host until it exits 0 (same retry rule)."""

    def probe() -> tuple[bool, str]:
        result = conn.run(command, timeout=timeout)
        out = (result.stdout or result.stderr).strip().splitlines()
        return result.exit_status == 0, f"exit {result.exit_status}" + (
            f": {out[-1][:200]}" if out else ""
        )

    return _retry(probe, retries, interval, sleep)


def list_releases(conn: RemoteHost, deploy_path: str) -> list[str]:
    """Staged releases, newest first (by directory mtime)."""
    root = _deploy_path(deploy_path)
    result = conn.run(
        ["sh", "-c", 'cd "$1/releases" 2>/dev/null && ls -1t', "ls", root], timeout=30
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


_PRUNE_SCRIPT = _PRUNE_FN + 'prune "$@"\n'


def prune_releases(
    conn: RemoteHost, deploy_path: str, *, keep: int, protect: Sequence[str | None] = ()
) -> list[str]:
    """Remove releases beyond the ``keep`` newest (by mtime); never ``current`` nor anything in
    ``protect`` (pass the previous release), nor a directory whose name is not a valid release
    name. Also clears ``.incoming`` leftovers older than an hour (an interrupted upload).
    Returns the removed names. One round trip; raises CommandFailed if it fails (what was
    removed before the failure stays removed: releases beyond ``keep`` are not live)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    root = _deploy_path(deploy_path)
    kept = [validate_version(p) for p in protect if p]
    result = conn.run(
        ["sh", "-c", _PRUNE_SCRIPT, "prune", root, str(keep), *kept], timeout=120, check=True
    )
    return [x[8:] for x in result.stdout.splitlines() if x.startswith("removed=")]


def render_values(
    template_values: Mapping[str, str | int], deploy_path: str
) -> dict[str, str | int]:
    """Template values for a host's commands: host values plus ``deploy_path``."""
    return {**template_values, "deploy_path": deploy_path}
