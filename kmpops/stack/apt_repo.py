"""A real Debian package database per stack host, and local apt repositories to patch it from.

Nothing here touches the machine's own packages: every ``apt-get``/``dpkg`` this module (or the
``packages`` commands of ops.yaml it prepares) runs names the host's private state — apt's
``Dir``/``Dir::State``/``Dir::Etc`` and dpkg's ``--root``/``--admindir`` — from one apt
configuration file per host, ``<host root>/etc/apt/kmpops-apt.conf``, which also ``#clear``s
the hooks the machine's own ``/etc/apt/apt.conf.d`` installs (``DPkg::Post-Invoke`` and the
like run as root: they must never fire for a host's private database).

* :func:`build_package` makes a tiny ``.deb`` with ``dpkg-deb --build``: one file,
  ``/usr/share/<name>/VERSION``, and optionally a ``postinst`` that fails.
* :func:`publish_repo` makes a flat repository (``deb [trusted=yes] file:DIR ./``): the
  packages, a ``Packages`` index from ``dpkg-scanpackages`` and a ``Release`` whose ``Suite``
  and ``Label`` say what it is (``bookworm-security`` / ``Debian-Security`` for security
  updates, the way unattended-upgrades tells them apart).
* :func:`prepare_host` gives a host root its apt configuration, sources and an empty dpkg
  database, root-owned (the deploy user reads them; only root, through the exact sudo rules,
  changes them).
* :func:`install_directly` seeds a host's database with ``dpkg --root`` (the packages the host
  "came with").

Trust: the apt configuration file, the sources and the repositories must stay root's. Whoever
can write any of them can make apt run a command as root (a hook, a maintainer script); the
sudo rules for the package manager are only as exact as these files are root-owned.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kmpops import shellsafe
from kmpops.stack._proc import StackError

__all__ = [
    "APT_CONF",
    "STACK_REPOS",
    "RepoSpec",
    "apt_conf_path",
    "build_package",
    "install_directly",
    "mark_reboot_required",
    "prepare_host",
    "prepare_stack",
    "publish_repo",
    "stack_repo",
]

APT_CONF = "etc/apt/kmpops-apt.conf"
# Hooks an apt.conf.d of the machine may define: cleared for every private database.
_HOOKS = (
    "DPkg::Pre-Invoke",
    "DPkg::Post-Invoke",
    "DPkg::Pre-Install-Pkgs",
    "DPkg::Options",
    "APT::Update::Pre-Invoke",
    "APT::Update::Post-Invoke",
    "APT::Update::Post-Invoke-Success",
    "DPkg::Post-Invoke-Success",
    "DPkg::Tools::Options",
    "DPkg::Pre-Install-Pkgs::Options",
    "APT::Install::Pre-Invoke",
    "APT::Install::Post-Invoke",
)
_TIMEOUT = 120


@dataclass(frozen=True)
class RepoSpec:
    """What a repository's ``Release`` says about itself."""

    suite: str = "bookworm"
    label: str = "Debian"
    origin: str = "Debian"


#: the local stack's repositories (``<stack root>/apt/<name>``) and what their Release says
STACK_REPOS: dict[str, RepoSpec] = {
    "main": RepoSpec(),
    "security": RepoSpec(suite="bookworm-security", label="Debian-Security"),
}


def stack_repo(stack_root: Path, name: str) -> Path:
    """The directory of the stack's repository ``name`` (one of :data:`STACK_REPOS`)."""
    if name not in STACK_REPOS:
        raise StackError(f"unknown stack repository {name!r} (known: {', '.join(STACK_REPOS)})")
    return Path(stack_root).resolve() / "apt" / name


def prepare_stack(stack_root: Path, host_roots: Iterable[Path]) -> list[Path]:
    """The local stack's package state: its repositories (empty until a test publishes into
    them, each keeping what it already holds) and every host root prepared to source them
    (:func:`prepare_host`). Returns the hosts' apt configuration files. Idempotent."""
    repos = []
    for name, spec in STACK_REPOS.items():
        repo = stack_repo(stack_root, name)
        repo.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(repo.parent, 0o755)  # noqa: S103 - apt reads it (like /var/lib)
        if not (repo / "Release").exists():
            publish_repo(repo, (), spec)
        repos.append(repo)
    return [prepare_host(Path(r), repos) for r in host_roots]


def apt_conf_path(host_root: Path) -> Path:
    """The host's apt configuration file (what ``packages.apt_config`` in ops.yaml names)."""
    return Path(host_root) / APT_CONF


def _run(argv: list[str], what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-800:]
        raise StackError(f"{what} failed ({done.returncode}): {tail}")
    return done.stdout


def build_package(
    workdir: Path,
    name: str,
    version: str,
    *,
    postinst_fails: bool = False,
    postinst_fails_if: str | None = None,
    reboot_required: bool = False,
) -> Path:
    """Build ``<workdir>/<name>_<version>_all.deb`` (``dpkg-deb --build --root-owner-group``)
    holding ``/usr/share/<name>/VERSION``.

    Its ``postinst`` (only when one of the options asks for it) exits 1 with ``postinst_fails``
    (dpkg leaves the package half-configured), or only on a host whose root holds the file
    ``postinst_fails_if`` (a path relative to the host root: how a test makes chosen hosts fail,
    like a real host whose disk or config differs); with ``reboot_required`` it writes
    ``var/run/reboot-required`` (and ``.pkgs``) as a kernel or libc update does. The scripts
    find the host root in ``$DPKG_ROOT`` (dpkg ``--root`` with ``--force-script-chrootless``).
    Returns the file. Raises StackError if dpkg-deb fails, UnsafeValueError for an unsafe name,
    version or path."""
    from kmpops.packages import validate_package, validate_version

    validate_package(name)
    validate_version(version)
    if postinst_fails_if is not None:
        shellsafe.validate_path(postinst_fails_if, what="postinst_fails_if")
    tree = Path(workdir) / f"{name}_{version}.tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "DEBIAN").mkdir(parents=True)
    share = tree / "usr" / "share" / name
    share.mkdir(parents=True)
    (share / "VERSION").write_text(version + "\n")
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: kmp-ops tests <ops@example.org>\nPriority: optional\nSection: misc\n"
        f"Description: kmp-ops test package {name} {version}\n"
    )
    lines: list[str] = []
    if reboot_required:
        lines += [
            'mkdir -p "$DPKG_ROOT/var/run"',
            'echo "*** System restart required ***" > "$DPKG_ROOT/var/run/reboot-required"',
            f'echo {name} >> "$DPKG_ROOT/var/run/reboot-required.pkgs"',
        ]
    if postinst_fails_if is not None:
        marker = shellsafe.quote(postinst_fails_if.lstrip("/"))
        lines += [
            f'if [ -e "$DPKG_ROOT"/{marker} ]; then',
            f'  echo "{name} {version}: postinst fails on this host" >&2',
            "  exit 1",
            "fi",
        ]
    if postinst_fails:
        lines += [f'echo "{name} {version}: postinst fails on purpose" >&2', "exit 1"]
    if lines:
        script = tree / "DEBIAN" / "postinst"
        script.write_text("#!/bin/sh\nset -e\n" + "\n".join(lines) + "\nexit 0\n")
        script.chmod(0o755)
    out = Path(workdir) / f"{name}_{version}_all.deb"
    _run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], "dpkg-deb --build")
    shutil.rmtree(tree, ignore_errors=True)
    return out


def publish_repo(
    repo: Path,
    debs: Iterable[Path] = (),
    spec: RepoSpec = RepoSpec(),
    *,
    date: datetime | None = None,
) -> Path:
    """Copy ``debs`` into the flat repository ``repo`` and (re)write its ``Packages`` index
    (``dpkg-scanpackages``; an empty index without it when there is nothing to index) and its
    ``Release`` (Origin, Label, Suite from ``spec``; ``Date`` = ``date``, default now — what
    a patch's age is measured from; the index's size and SHA256). apt keeps the Release it
    already has when a new one's Date is older (replay protection): a repository published
    again needs a Date no older than the last. Idempotent; returns ``repo``.
    Raises StackError if packages are to be indexed and dpkg-scanpackages is missing or fails."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    os.chmod(repo, 0o755)  # noqa: S103 - a repository is world-readable
    for deb in debs:
        shutil.copy2(deb, repo / Path(deb).name)
    if any(repo.glob("*.deb")):
        if shutil.which("dpkg-scanpackages") is None:
            raise StackError("dpkg-scanpackages is missing (apt-get install dpkg-dev)")
        # run from the repo: Filename fields are relative to it
        done = subprocess.run(
            ["dpkg-scanpackages", "--multiversion", "."],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"dpkg-scanpackages failed: {done.stderr[-800:]}")
        index = done.stdout
    else:
        index = ""
    (repo / "Packages").write_text(index)
    raw = index.encode()
    when = (date or datetime.now(UTC)).astimezone(UTC)
    stamp = when.strftime("%a, %d %b %Y %H:%M:%S UTC")
    (repo / "Release").write_text(
        f"Origin: {spec.origin}\nLabel: {spec.label}\nSuite: {spec.suite}\n"
        f"Codename: {spec.suite}\nDate: {stamp}\nArchitectures: all amd64\n"
        "Description: kmp-ops local test repository\n"
        f"SHA256:\n {hashlib.sha256(raw).hexdigest()} {len(raw)} Packages\n"
    )
    for path in repo.iterdir():
        os.chmod(path, 0o644)
    return repo


def prepare_host(host_root: Path, repos: Iterable[Path]) -> Path:
    """Give ``host_root`` a private apt/dpkg state sourcing ``repos``; returns its apt config.

    Writes ``etc/apt/kmpops-apt.conf`` (Dir, Dir::State, Dir::Etc, Dir::Cache, Dir::Log under
    the host root; dpkg with ``--root``, ``--admindir``, ``--log`` there and
    ``--force-script-chrootless``, so maintainer scripts run without a chroot into a root that
    has no shell, with ``DPKG_ROOT`` set; the machine's hooks cleared), ``etc/apt/sources.list``
    and an empty dpkg database (kept if one exists). Everything is root's, mode 0755/0644.
    Idempotent."""
    root = Path(host_root).resolve()
    shellsafe.validate_absolute_path(str(root), what="host root")  # it goes into apt's syntax
    for sub in (
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "etc/apt/trusted.gpg.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/log/apt",
        "var/run",
        "usr/share",
    ):
        path = root / sub
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)  # noqa: S103 - root's, readable like /var/lib/dpkg
    for name in ("status", "available"):
        (root / "var/lib/dpkg" / name).touch()
    conf = apt_conf_path(root)
    lines = [f"#clear {hook};" for hook in _HOOKS]
    lines += [
        f'Dir "{root}/";',
        f'Dir::State "{root}/var/lib/apt/";',
        f'Dir::State::status "{root}/var/lib/dpkg/status";',
        f'Dir::Etc "{root}/etc/apt/";',
        f'Dir::Etc::Parts "{root}/etc/apt/apt.conf.d/";',
        f'Dir::Cache "{root}/var/cache/apt/";',
        f'Dir::Log "{root}/var/log/apt/";',
        'Dir::Bin::dpkg "/usr/bin/dpkg";',
        'Dir::Cache::pkgcache "";',
        'Dir::Cache::srcpkgcache "";',
        'Acquire::Languages "none";',
        'Dpkg::Use-Pty "0";',
        # the file: method reads the repository as root; no sandbox user needs to enter it
        'APT::Sandbox::User "root";',
        "DPkg::Options {",
        f'  "--root={root}";',
        f'  "--admindir={root}/var/lib/dpkg";',
        f'  "--log={root}/var/log/dpkg.log";',
        '  "--force-script-chrootless";',
        '  "--force-confold";',  # unattended: keep a host's changed conffiles, never ask
        "};",
    ]
    conf.write_text("\n".join(lines) + "\n")
    os.chmod(conf, 0o644)
    sources = [f"deb [trusted=yes] file:{Path(r).resolve()} ./" for r in repos]
    (root / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    for path in (conf, root / "etc/apt/sources.list"):
        os.chown(path, 0, 0)
    return conf


def install_directly(host_root: Path, debs: Iterable[Path]) -> None:
    """Install ``debs`` into the host's private database with ``dpkg --root`` (as root, never
    the machine's database): what the host has before any patch. Raises StackError."""
    root = Path(host_root).resolve()
    _run(
        [
            "dpkg",
            f"--root={root}",
            f"--admindir={root}/var/lib/dpkg",
            f"--log={root}/var/log/dpkg.log",
            "--force-script-chrootless",
            "--install",
            *[str(d) for d in debs],
        ],
        "dpkg --install",
    )


def mark_reboot_required(host_root: Path, packages: Mapping[str, str] | Iterable[str]) -> None:
    """Write ``var/run/reboot-required`` (and ``.pkgs``) in the host root, as a kernel or libc
    update's postinst does on Debian."""
    run = Path(host_root) / "var" / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "reboot-required").write_text("*** System restart required ***\n")
    (run / "reboot-required.pkgs").write_text("".join(f"{p}\n" for p in packages))
