"""OS packages of the hosts, without Prefect: the package manager's commands, what they print,
and the pure decisions of patch-hosts (what to patch, its impact, whether it worked, what is
overdue).

Facts come from the host's own package manager — for apt, a simulated upgrade (``apt-get -s
upgrade``: which packages would go from which version to which, from which repository), the
repositories' Release fields (Label, Suite, Date: a security update is one from a repository
whose Label or Suite says so, the way unattended-upgrades tells them apart), dpkg's database
(``dpkg-query -W``: the versions really installed and whether they are configured), and the
``reboot-required`` file. :class:`PackageManager` renders the commands for one host (every value
validated and each word quoted when it reaches the shell; the commands that change packages
are word lists for ``sudo -n``, and :meth:`PackageManager.sudo_rules` writes the exact sudoers
rules that allow them — sudo regular expressions where an argument is a ``name=version`` list);
the ``parse_*`` functions read their output; the rest decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal

from kmpops import shellsafe
from kmpops.errors import UnsafeValueError

if TYPE_CHECKING:
    from kmpops.config import PackagesConfig

__all__ = [
    "HostPackageState",
    "HostVerification",
    "InstalledPackage",
    "OverdueUpdate",
    "PackageChange",
    "PackageManager",
    "PatchImpact",
    "PendingUpdate",
    "UpdateKind",
    "assess_impact",
    "is_security",
    "overdue_security",
    "parse_dpkg_query",
    "parse_index_targets",
    "parse_installed_lines",
    "parse_pending_lines",
    "parse_reboot",
    "parse_release_fields",
    "parse_simulated_upgrade",
    "plan_host",
    "revert_changes",
    "validate_package",
    "validate_version",
    "verify_host",
]

UpdateKind = Literal["security", "all"]

# Debian policy allows [a-z0-9+.-] (and other managers a little more); never a leading "-",
# which a command would read as an option. Versions: epoch ":" upstream "-" revision, "~" "+".
PACKAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._-]{0,127}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~:-]{0,127}")
# The same two as sudo regular expressions (POSIX ERE; ':' and '=' escaped for sudoers, and
# kept out of bracket expressions, where sudoers leaves the backslash in).
_SUDO_PACKAGE = r"[A-Za-z0-9][A-Za-z0-9+._-]*"
_SUDO_VERSION = r"([A-Za-z0-9.+~-]|\:)+"


def validate_package(name: str) -> str:
    """``name`` if it is a safe package name; UnsafeValueError naming it otherwise."""
    if not isinstance(name, str) or not PACKAGE_RE.fullmatch(name):
        raise UnsafeValueError(
            f"package name {name!r} is not a package name (letters, digits, '+', '.', '_', '-'; "
            "starting with a letter or digit; at most 128)"
        )
    return name


def validate_version(version: str) -> str:
    """``version`` if it is a safe package version; UnsafeValueError naming it otherwise."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise UnsafeValueError(
            f"package version {version!r} is not a version (letters, digits, '.', '+', '~', "
            "':', '-'; starting with a letter or digit; at most 128)"
        )
    return version


# -- facts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingUpdate:
    """One package a host would upgrade: from ``installed`` (None: a new package the upgrade
    pulls in) to ``candidate``, from ``origins`` (``Label:Suite`` of each repository offering
    it); ``released`` is the newest of those repositories' Release dates, when known."""

    package: str
    installed: str | None
    candidate: str
    security: bool
    origins: tuple[str, ...] = ()
    released: datetime | None = None


@dataclass(frozen=True)
class InstalledPackage:
    """A package in dpkg's database: its version and status (``ii`` = installed and configured;
    anything else, e.g. ``iF`` half-configured after a failed postinst, is not ok)."""

    package: str
    version: str
    status: str = "ii"

    @property
    def ok(self) -> bool:
        """Installed and configured."""
        return self.status.strip() in ("ii", "ok")


@dataclass(frozen=True)
class HostPackageState:
    """What one host's package manager says: pending updates, installed packages, reboot."""

    host: str
    environment: str
    pending: tuple[PendingUpdate, ...]
    installed: Mapping[str, InstalledPackage]
    reboot_required: bool = False
    reboot_packages: tuple[str, ...] = ()

    @property
    def security(self) -> list[PendingUpdate]:
        """The pending security updates."""
        return [u for u in self.pending if u.security]

    def versions(self) -> dict[str, str]:
        """package -> installed version."""
        return {name: p.version for name, p in self.installed.items()}


def is_security(label: str, suite: str) -> bool:
    """Whether a repository with this Release Label and Suite carries security updates
    (``Debian-Security`` / ``bookworm-security``, ``Ubuntu``'s ``jammy-security``, …)."""
    return "security" in label.lower() or suite.lower().endswith("-security")


_INST = re.compile(r"^Inst (\S+) (?:\[([^\]]+)\] )?\((\S+)(?: (.*?))?(?: \[[^\]]*\])?\)")


def parse_simulated_upgrade(
    text: str, released: Mapping[tuple[str, str], datetime] | None = None
) -> list[PendingUpdate]:
    """The ``Inst`` lines of ``apt-get -s upgrade``: ``Inst NAME [OLD] (NEW ORIGINS [ARCH])``
    where ORIGINS is ``Label:Suite`` or ``Label:Version/Suite``, comma-separated when several
    repositories offer the version. ``released`` maps (Label, Suite) to the repository's
    Release date (:func:`parse_release_fields`). Other lines are ignored."""
    updates = []
    for line in text.splitlines():
        match = _INST.match(line.strip())
        if not match:
            continue
        name, old, new, origin_text = match.groups()
        origins: list[str] = []
        security = False
        dates: list[datetime] = []
        for part in (origin_text or "").split(", "):
            part = part.strip()
            if not part:
                continue
            label, _, rest = part.partition(":")
            suite = rest.rsplit("/", 1)[-1]
            origins.append(f"{label}:{suite}" if rest else label)
            security = security or is_security(label, suite)
            if released and (label, suite) in released:
                dates.append(released[(label, suite)])
        updates.append(
            PendingUpdate(
                package=name,
                installed=old,
                candidate=new,
                security=security,
                origins=tuple(origins),
                released=max(dates) if dates else None,
            )
        )
    return updates


def parse_dpkg_query(text: str) -> dict[str, InstalledPackage]:
    """``dpkg-query -W -f '${Package}\\t${Version}\\t${db:Status-Abbrev}\\n'`` output (packages
    that are not installed — status ``un``/``rc`` with no version — are left out)."""
    found: dict[str, InstalledPackage] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            continue
        status = parts[2].strip() if len(parts) > 2 else "ii"
        if status[:1] in ("u", "r") or status.startswith("pn"):
            continue
        found[parts[0]] = InstalledPackage(parts[0], parts[1], status)
    return found


def parse_index_targets(text: str) -> list[tuple[str, str, str]]:
    """``apt-get indextargets --format '$(LABEL)|$(SUITE)|$(FILENAME)'``: (label, suite, file)."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[2]:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


_RELEASE_FIELD = re.compile(r"^(.*Release):(Origin|Label|Suite|Codename|Date): ?(.*)$")


def parse_release_fields(text: str) -> dict[tuple[str, str], datetime]:
    """(Label, Suite) -> Date of each Release file, from ``grep -H`` lines ``FILE:Field: value``
    over apt's lists directory (a file without a parsable Date is left out)."""
    files: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        match = _RELEASE_FIELD.match(line.strip())
        if match:
            files.setdefault(match.group(1), {}).setdefault(match.group(2), match.group(3).strip())
    dates: dict[tuple[str, str], datetime] = {}
    for fields in files.values():
        try:
            when = parsedate_to_datetime(fields.get("Date", ""))
        except (TypeError, ValueError):
            continue
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        for suite in {fields.get("Suite", ""), fields.get("Codename", "")} - {""}:
            dates[(fields.get("Label", fields.get("Origin", "")), suite)] = when
    return dates


def parse_pending_lines(text: str) -> list[PendingUpdate]:
    """A configured ``pending`` command's lines: ``NAME INSTALLED CANDIDATE security|other
    [RELEASED]`` (INSTALLED ``-`` for a new package; RELEASED an ISO date). Raises ValueError
    naming a line that does not fit."""
    updates = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) not in (4, 5) or words[3] not in ("security", "other"):
            raise ValueError(f"pending updates line {number} is not 'NAME OLD NEW KIND': {line!r}")
        name, old, new, kind = words[:4]
        validate_package(name)
        validate_version(new)
        released = None
        if len(words) == 5:
            released = datetime.fromisoformat(words[4])
            released = released if released.tzinfo else released.replace(tzinfo=UTC)
        updates.append(
            PendingUpdate(
                name,
                None if old == "-" else validate_version(old),
                new,
                kind == "security",
                (kind,),
                released,
            )
        )
    return updates


def parse_installed_lines(text: str) -> dict[str, InstalledPackage]:
    """A configured ``installed`` command's lines: ``NAME VERSION [ok|broken]``."""
    found = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2:
            status = "ok" if len(words) == 2 or words[2] == "ok" else words[2]
            found[words[0]] = InstalledPackage(words[0], words[1], status)
    return found


def parse_reboot(text: str) -> tuple[bool, tuple[str, ...]]:
    """(reboot required, the packages that asked for it), from the output of
    :meth:`PackageManager.reboot_command`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "reboot-required":
        return False, ()
    return True, tuple(dict.fromkeys(lines[1:]))


# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageChange:
    """One package to move on one host: ``from_version`` (None: not installed) → ``to_version``."""

    package: str
    from_version: str | None
    to_version: str
    security: bool = False

    def __post_init__(self) -> None:
        validate_package(self.package)
        validate_version(self.to_version)
        if self.from_version is not None:
            validate_version(self.from_version)


def _sudo_regex_word(word: str) -> str:
    """A fixed word inside a sudo regular expression: regex metacharacters and sudoers'
    ``,:=`` escaped (sudoers keeps the backslash, the regex reads a literal)."""
    out = []
    for ch in word:
        if ch in r".^$*+?()[]{}|\,:=":
            out.append("\\" + ch)
        elif re.fullmatch(r"[A-Za-z0-9_/%@~-]", ch):
            out.append(ch)
        else:
            raise UnsafeValueError(f"{word!r} cannot be written as an exact sudoers rule ({ch!r})")
    return "".join(out)


class PackageManager:
    """The package manager commands of one host, from its environment's ``packages`` config and
    the host's template values (``{root}`` and the other vars).

    Word lists (``*_argv``) run without a shell; the ones marked *root* run through the host's
    become (``sudo -n -u root -- WORDS``). Strings (``*_command``) are for the login shell,
    every value quoted. Raises UnsafeValueError for a value that is not safe where it goes.
    """

    def __init__(self, cfg: PackagesConfig, values: Mapping[str, str | int]) -> None:
        self.cfg = cfg
        self.values = dict(values)

    def _path(self, template: str | None, what: str) -> str | None:
        if template is None:
            return None
        filled = template
        for key, value in self.values.items():
            filled = filled.replace("{" + key + "}", str(value))
        if "{" in filled:
            raise UnsafeValueError(f"packages.{what}: {template!r} has an unknown placeholder")
        return shellsafe.validate_absolute_path(filled, what=f"packages.{what}")

    def _apt(self) -> list[str]:
        conf = self._path(self.cfg.apt_config, "apt_config")
        return [self.cfg.apt_get, *(["-c", conf] if conf else [])]

    def _template(self, name: str, specs: Sequence[str] = ()) -> list[str]:
        commands = self.cfg.commands
        assert commands is not None
        template = getattr(commands, name)
        if template is None:
            raise UnsafeValueError(f"packages.commands.{name} is not configured")
        words: list[str] = []
        for word in template.split():
            if word == "{packages}":
                words += list(specs)
            else:
                words += shellsafe.render_argv(word, self.values)
        return words

    def _specs(self, changes: Sequence[PackageChange]) -> list[str]:
        if not changes:
            raise UnsafeValueError("no packages to install")
        fmt = self.cfg.commands.package_format if self.cfg.commands else "{package}={version}"
        return [
            fmt.replace("{package}", c.package).replace("{version}", c.to_version) for c in changes
        ]

    # what runs

    def refresh_argv(self) -> list[str] | None:
        """*root*: refresh the package lists (``apt-get update``); None if not configured."""
        if self.cfg.manager == "apt":
            return [*self._apt(), "-q", "update"]
        return self._template("refresh") if self.cfg.commands.refresh else None  # type: ignore[union-attr]

    def pending_argv(self) -> list[str]:
        """The simulated upgrade (``apt-get -s -q upgrade``): what would change; needs no root."""
        if self.cfg.manager == "apt":
            return [*self._apt(), "-s", "-q", "upgrade"]
        return self._template("pending")

    def installed_argv(self) -> list[str]:
        """The installed packages, read back from the package database (``dpkg-query -W``)."""
        if self.cfg.manager == "apt":
            admindir = self._path(self.cfg.dpkg_admindir, "dpkg_admindir")
            return [
                self.cfg.dpkg_query,
                *([f"--admindir={admindir}"] if admindir else []),
                "-W",
                "-f",
                "${Package}\\t${Version}\\t${db:Status-Abbrev}\\n",
            ]
        return self._template("installed")

    def index_targets_argv(self) -> list[str] | None:
        """apt's index files with their repository's Label and Suite (apt only)."""
        if self.cfg.manager != "apt":
            return None
        return [*self._apt(), "indextargets", "--format", "$(LABEL)|$(SUITE)|$(FILENAME)"]

    @staticmethod
    def release_fields_command(lists_dirs: Iterable[str]) -> str | None:
        """``grep`` the Release files of apt's lists directories for Origin, Label, Suite, Date
        (one shell line; each directory validated and quoted, the glob outside the quotes)."""
        dirs = sorted(set(lists_dirs))
        if not dirs:
            return None
        globs = " ".join(
            f"{shellsafe.quote(shellsafe.validate_absolute_path(d, what='apt lists dir'))}/*Release"
            for d in dirs
        )
        return f"grep -s -H -E '^(Origin|Label|Suite|Codename|Date):' {globs}; true"

    def reboot_command(self) -> str:
        """Prints ``reboot-required`` and the packages that asked for it, or nothing."""
        path = self._path(self.cfg.reboot_required_file, "reboot_required_file")
        assert path is not None
        quoted, pkgs = shellsafe.quote(path), shellsafe.quote(path + ".pkgs")
        return f"if [ -e {quoted} ]; then echo reboot-required; cat {pkgs} 2>/dev/null; fi; true"

    def install_argv(self, changes: Sequence[PackageChange]) -> list[str]:
        """*root*: install exactly these versions (``apt-get -y -q install --no-install-recommends
        -- NAME=VERSION …``)."""
        if self.cfg.manager == "apt":
            return [*self._apt(), *_APT_INSTALL, "--", *self._specs(changes)]
        return self._template("install", self._specs(changes))

    def downgrade_argv(self, changes: Sequence[PackageChange]) -> list[str] | None:
        """*root*: the pinned downgrade back to ``to_version`` (``apt-get install
        --allow-downgrades -- NAME=OLD``); None when the manager has no downgrade command."""
        if self.cfg.manager == "apt":
            return [*self._apt(), *_APT_DOWNGRADE, "--", *self._specs(changes)]
        if self.cfg.commands is None or self.cfg.commands.downgrade is None:
            return None
        return self._template("downgrade", self._specs(changes))

    def root_argvs(self) -> list[list[str]]:
        """A sample of each root command (one package), for checking the sudo rules first."""
        sample = [PackageChange("sample", None, "1")]
        argvs = [self.refresh_argv(), self.install_argv(sample), self.downgrade_argv(sample)]
        return [a for a in argvs if a]

    def sudo_rules(self) -> list[str]:
        """The sudoers command specs (``PROGRAM ARGS``) that allow exactly the root commands:
        the refresh word for word; install and downgrade as a sudo regular expression
        (sudo 1.9.10+) whose variable part is a list of ``NAME=VERSION`` words, none of which
        can start with ``-`` (no option can be slipped in)."""
        from kmpops.become import _sudoers_word

        spec = _SUDO_PACKAGE + r"\=" + _SUDO_VERSION
        if self.cfg.commands is not None:
            fmt = self.cfg.commands.package_format
            head, _, tail = fmt.partition("{package}")
            mid, _, end = tail.partition("{version}")
            spec = (
                _sudo_regex_word(head)
                + _SUDO_PACKAGE
                + _sudo_regex_word(mid)
                + _SUDO_VERSION
                + _sudo_regex_word(end)
            )
        rules = []
        refresh = self.refresh_argv()
        if refresh:
            rules.append(" ".join(_sudoers_word(w, what="packages refresh") for w in refresh))
        marker = PackageChange("kmpops-marker", None, "0")
        for argv in (self.install_argv([marker]), self.downgrade_argv([marker])):
            if not argv:
                continue
            at = argv.index(self._specs([marker])[0])
            fixed_before = [_sudo_regex_word(w) for w in argv[1:at]]
            fixed_after = [_sudo_regex_word(w) for w in argv[at + 1 :]]
            pattern = " ".join([*fixed_before, f"{spec}( {spec})*", *fixed_after])
            rules.append(f"{_sudoers_word(argv[0], what='packages program')} ^{pattern}$")
        return rules

    def parse_pending(
        self, text: str, released: Mapping[tuple[str, str], datetime] | None = None
    ) -> list[PendingUpdate]:
        """The pending updates in the output of :meth:`pending_argv`."""
        if self.cfg.manager == "apt":
            return parse_simulated_upgrade(text, released)
        return parse_pending_lines(text)

    def parse_installed(self, text: str) -> dict[str, InstalledPackage]:
        """The installed packages in the output of :meth:`installed_argv`."""
        if self.cfg.manager == "apt":
            return parse_dpkg_query(text)
        return parse_installed_lines(text)


_APT_INSTALL = ("-y", "-q", "install", "--no-install-recommends")
_APT_DOWNGRADE = ("-y", "-q", "install", "--allow-downgrades", "--no-install-recommends")


# -- decisions ---------------------------------------------------------------------------------


def plan_host(
    state: HostPackageState, *, kind: UpdateKind, packages: Sequence[str] = ()
) -> list[PackageChange]:
    """The changes for one host: its pending updates (only security ones for ``kind``
    ``security``; only ``packages`` when given), security first, then by name, each pinned
    to the candidate version the simulation showed (what is approved is what gets installed)."""
    wanted = set(packages)
    chosen = [
        u
        for u in state.pending
        if (kind == "all" or u.security) and (not wanted or u.package in wanted)
    ]
    chosen.sort(key=lambda u: (not u.security, u.package))
    return [PackageChange(u.package, u.installed, u.candidate, u.security) for u in chosen]


@dataclass(frozen=True)
class PatchImpact:
    """Which hosts and services a patch touches, per environment, and how far it reaches."""

    rows: tuple[dict[str, object], ...]
    hosts_touched: int
    hosts_total: int
    security_updates: int
    other_updates: int
    services: tuple[str, ...]
    risk_level: str
    risk_score: int
    risk_markdown: str

    @property
    def blast_radius(self) -> str:
        """``touched/total hosts (N %)`` over every host in the config."""
        share = self.hosts_touched / self.hosts_total if self.hosts_total else 0.0
        return f"{self.hosts_touched}/{self.hosts_total} hosts ({share:.0%})"


def assess_impact(
    plans: Mapping[str, Mapping[str, Sequence[PackageChange]]],
    *,
    hosts_total: int,
    services: Sequence[str],
    at: datetime,
) -> PatchImpact:
    """The impact of ``plans`` (environment -> host -> changes): one row per host and package
    (security first), the hosts touched of ``hosts_total`` (every host in the config: the real
    blast radius), the services on them, and the risk (``kmpops.plans.risk``)."""
    from kmpops.plans.risk import assess_risk

    rows: list[dict[str, object]] = []
    touched = 0
    security = other = 0
    for env, hosts in plans.items():
        for host, changes in hosts.items():
            if changes:
                touched += 1
            for c in changes:
                security += c.security
                other += not c.security
                rows.append(
                    {
                        "environment": env,
                        "host": host,
                        "package": c.package,
                        "kind": "security" if c.security else "other",
                        "installed": c.from_version or "(new)",
                        "candidate": c.to_version,
                        "services": ", ".join(services) or "-",
                    }
                )
    rows.sort(key=lambda r: (r["kind"] != "security", str(r["environment"]), str(r["host"])))
    risk = assess_risk(
        environments=[e for e, hosts in plans.items() if any(hosts.values())],
        hosts_touched=touched,
        hosts_total=max(hosts_total, touched),
        services=len(services),
        at=at,
    )
    return PatchImpact(
        tuple(rows),
        touched,
        hosts_total,
        security,
        other,
        tuple(services),
        risk.level,
        risk.score,
        risk.to_markdown(),
    )


@dataclass(frozen=True)
class HostVerification:
    """A host's packages after a change, read back from its database: per package the version
    before, the target, the version now and its status; ``ok`` when every one is at its
    target and configured."""

    host: str
    rows: tuple[dict[str, object], ...]

    @property
    def ok(self) -> bool:
        """Every package at its target version and configured."""
        return all(r["ok"] for r in self.rows)

    @property
    def failed(self) -> list[str]:
        """The packages not at their target (or not configured)."""
        return [str(r["package"]) for r in self.rows if not r["ok"]]


def verify_host(
    host: str,
    changes: Sequence[PackageChange],
    before: Mapping[str, InstalledPackage],
    after: Mapping[str, InstalledPackage],
) -> HostVerification:
    """Compare the database read back after a change with the planned ``changes``."""
    rows = []
    for c in changes:
        was, now = before.get(c.package), after.get(c.package)
        ok = now is not None and now.version == c.to_version and now.ok
        rows.append(
            {
                "host": host,
                "package": c.package,
                "before": was.version if was else None,
                "target": c.to_version,
                "after": now.version if now else None,
                "status": now.status if now else "not installed",
                "ok": ok,
            }
        )
    return HostVerification(host, tuple(rows))


def revert_changes(
    changes: Sequence[PackageChange],
    before: Mapping[str, InstalledPackage],
    after: Mapping[str, InstalledPackage],
) -> tuple[list[PackageChange], list[str]]:
    """What puts a host back: for each planned package whose version or state moved, the
    pinned downgrade to the version it had (a change back), and the packages that cannot be
    put back that way (they were not installed before: removing them is a person's call)."""
    back: list[PackageChange] = []
    cannot: list[str] = []
    for c in changes:
        was, now = before.get(c.package), after.get(c.package)
        if was is not None and now is not None and now.version == was.version and now.ok:
            continue  # untouched
        if was is None:
            if now is not None:
                cannot.append(c.package)
            continue
        back.append(PackageChange(c.package, now.version if now else None, was.version))
    return back, cannot


@dataclass(frozen=True)
class OverdueUpdate:
    """A pending security update past its SLA."""

    environment: str
    host: str
    package: str
    candidate: str
    age_days: float
    sla_days: int
    since: datetime
    measured_from: Literal["release", "first seen"]

    @property
    def overdue_days(self) -> float:
        """Days past the SLA."""
        return self.age_days - self.sla_days


def update_age(
    update: PendingUpdate, first_seen: datetime | None, now: datetime
) -> tuple[timedelta, datetime, Literal["release", "first seen"]] | None:
    """How long ``update`` has been available: from its repository's Release date, else from
    when kmp-ops first saw it pending; None when neither is known."""
    if update.released is not None:
        return now - update.released, update.released, "release"
    if first_seen is not None:
        return now - first_seen, first_seen, "first seen"
    return None


def overdue_security(
    states: Iterable[HostPackageState],
    *,
    sla_days: Mapping[str, int],
    first_seen: Mapping[tuple[str, str, str], datetime],
    now: datetime,
) -> tuple[list[OverdueUpdate], list[tuple[HostPackageState, PendingUpdate, float]]]:
    """The pending security updates past their environment's SLA (``sla_days`` by
    environment), and every pending security update with its age in days (for the alert's
    samples). ``first_seen`` is keyed by (host, package, candidate)."""
    overdue: list[OverdueUpdate] = []
    ages: list[tuple[HostPackageState, PendingUpdate, float]] = []
    for state in states:
        sla = sla_days.get(state.environment)
        if sla is None:
            continue
        for update in state.security:
            age = update_age(
                update, first_seen.get((state.host, update.package, update.candidate)), now
            )
            if age is None:
                continue
            days = age[0].total_seconds() / 86400
            ages.append((state, update, days))
            if days > sla:
                overdue.append(
                    OverdueUpdate(
                        state.environment,
                        state.host,
                        update.package,
                        update.candidate,
                        round(days, 2),
                        sla,
                        age[1],
                        age[2],
                    )
                )
    return overdue, ages


@dataclass
class BatchReport:
    """What a batch of hosts did (for the documentation): per host, the rows of its
    verification, and the hosts put back or flagged."""

    label: str
    hosts: list[str]
    verifications: list[HostVerification] = field(default_factory=list)
    reverted: dict[str, list[str]] = field(default_factory=dict)
    flagged: dict[str, str] = field(default_factory=dict)
