"""kmpops.packages: what apt and dpkg print, and the decisions of patch-hosts, as case tables."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from kmpops.config import PackagesConfig
from kmpops.errors import UnsafeValueError
from kmpops.packages import (
    HostPackageState,
    InstalledPackage,
    PackageChange,
    PackageManager,
    PendingUpdate,
    assess_impact,
    is_security,
    overdue_security,
    parse_dpkg_query,
    parse_index_targets,
    parse_pending_lines,
    parse_reboot,
    parse_release_fields,
    parse_simulated_upgrade,
    plan_host,
    revert_changes,
    validate_package,
    validate_version,
    verify_host,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

SIMULATED = """\
NOTE: This is only a simulation!
      apt-get needs root privileges for real execution.
Reading package lists...
Calculating upgrade...
The following packages will be upgraded:
  kmp-agent kmp-libssl kmp-tool
Inst kmp-agent [2.0-1] (2.1-1 Debian:bookworm [all])
Inst kmp-libssl [3.0.1-1] (3.0.1-2 Debian-Security:bookworm-security [all])
Inst libc6 [2.36-9+deb12u3] (2.36-9+deb12u4 Debian:12.5/stable, \
Debian-Security:12/stable-security [amd64])
Inst linux-image-6.1.0-18-amd64 (6.1.76-1 Debian-Security:12/stable-security [amd64])
Conf kmp-agent (2.1-1 Debian:bookworm [all])
"""


@pytest.mark.parametrize(
    ("package", "installed", "candidate", "security", "origins"),
    [
        ("kmp-agent", "2.0-1", "2.1-1", False, ("Debian:bookworm",)),
        ("kmp-libssl", "3.0.1-1", "3.0.1-2", True, ("Debian-Security:bookworm-security",)),
        (
            "libc6",
            "2.36-9+deb12u3",
            "2.36-9+deb12u4",
            True,
            ("Debian:stable", "Debian-Security:stable-security"),
        ),
        (
            "linux-image-6.1.0-18-amd64",
            None,
            "6.1.76-1",
            True,
            ("Debian-Security:stable-security",),
        ),
    ],
)
def test_simulated_upgrade_lines(package, installed, candidate, security, origins) -> None:
    found = {u.package: u for u in parse_simulated_upgrade(SIMULATED)}
    assert len(found) == 4  # Conf and the other lines are not updates
    update = found[package]
    assert (update.installed, update.candidate, update.security, update.origins) == (
        installed,
        candidate,
        security,
        origins,
    )


def test_release_dates_reach_the_updates() -> None:
    grep = (
        "/h/var/lib/apt/lists/_srv_main_._Release:Origin: Debian\n"
        "/h/var/lib/apt/lists/_srv_main_._Release:Label: Debian\n"
        "/h/var/lib/apt/lists/_srv_main_._Release:Suite: bookworm\n"
        "/h/var/lib/apt/lists/_srv_main_._Release:Date: Sat, 01 Nov 2026 10:00:00 UTC\n"
        "/h/var/lib/apt/lists/_srv_sec_._Release:Label: Debian-Security\n"
        "/h/var/lib/apt/lists/_srv_sec_._Release:Suite: bookworm-security\n"
        "/h/var/lib/apt/lists/_srv_sec_._Release:Date: Mon, 10 Nov 2026 08:30:00 UTC\n"
        "/h/var/lib/apt/lists/_srv_bad_._Release:Label: X\n"
        "/h/var/lib/apt/lists/_srv_bad_._Release:Date: yesterday\n"
    )
    dates = parse_release_fields(grep)
    assert dates[("Debian-Security", "bookworm-security")] == datetime(
        2026, 11, 10, 8, 30, tzinfo=UTC
    )
    assert ("X", "") not in dates
    updates = {u.package: u for u in parse_simulated_upgrade(SIMULATED, dates)}
    assert updates["kmp-libssl"].released == datetime(2026, 11, 10, 8, 30, tzinfo=UTC)
    assert updates["kmp-agent"].released == datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    assert updates["libc6"].released is None  # its repositories' dates are unknown


@pytest.mark.parametrize(
    ("label", "suite", "security"),
    [
        ("Debian-Security", "bookworm-security", True),
        ("Debian", "bookworm-security", True),
        ("Ubuntu", "jammy-security", True),
        ("Debian", "bookworm", False),
        ("Debian", "bookworm-updates", False),
    ],
)
def test_security_repositories(label, suite, security) -> None:
    assert is_security(label, suite) is security


def test_dpkg_query_keeps_installed_packages_with_their_status() -> None:
    text = "kmp-agent\t2.1-1\tiF \nkmp-tool\t1.0-1\tii \ngone\t\tun \nold\t1\trc \n"
    found = parse_dpkg_query(text)
    assert set(found) == {"kmp-agent", "kmp-tool"}
    assert not found["kmp-agent"].ok and found["kmp-tool"].ok


def test_index_targets_and_reboot() -> None:
    assert parse_index_targets("Debian|bookworm|/x/lists/a_Packages.lz4\n|\n") == [
        ("Debian", "bookworm", "/x/lists/a_Packages.lz4")
    ]
    assert parse_reboot("") == (False, ())
    assert parse_reboot("reboot-required\nkmp-libssl\nkmp-libssl\nlinux\n") == (
        True,
        ("kmp-libssl", "linux"),
    )


def test_configured_pending_lines() -> None:
    updates = parse_pending_lines("openssl 3.0.1 3.0.2 security 2026-11-01\nnewpkg - 1.0 other\n")
    assert updates[0].security and updates[0].released == datetime(2026, 11, 1, tzinfo=UTC)
    assert updates[1].installed is None and not updates[1].security
    with pytest.raises(ValueError, match="line 1"):
        parse_pending_lines("openssl 3.0.1\n")
    with pytest.raises(UnsafeValueError):
        parse_pending_lines("-oAPT::x 1 2 other\n")


@pytest.mark.parametrize(
    "name", ["kmp-tool; id", "-oAPT::Update::Pre-Invoke::=id", "a b", "../x", "", "x" * 200]
)
def test_unsafe_package_names_are_refused(name) -> None:
    with pytest.raises(UnsafeValueError, match="not a package name"):
        validate_package(name)


@pytest.mark.parametrize("version", ["1.0 -o", "$(id)", "-1", "1.0\n"])
def test_unsafe_versions_are_refused(version) -> None:
    with pytest.raises(UnsafeValueError):
        validate_version(version)


def test_good_names_and_versions_pass() -> None:
    assert validate_package("libstdc++6") == "libstdc++6"
    assert validate_version("2:1.0~rc1+dfsg-3") == "2:1.0~rc1+dfsg-3"


def state(host="h1", env="production", pending=(), installed=None) -> HostPackageState:
    return HostPackageState(host, env, tuple(pending), installed or {})


def test_plan_pins_candidates_security_first() -> None:
    st = state(
        pending=[
            PendingUpdate("zz-tool", "1", "2", False),
            PendingUpdate("libssl", "3.0.1", "3.0.2", True),
            PendingUpdate("aa-lib", "1", "1.1", False),
        ]
    )
    assert [(c.package, c.to_version) for c in plan_host(st, kind="all")] == [
        ("libssl", "3.0.2"),
        ("aa-lib", "1.1"),
        ("zz-tool", "2"),
    ]
    assert [c.package for c in plan_host(st, kind="security")] == ["libssl"]
    assert [c.package for c in plan_host(st, kind="all", packages=["zz-tool"])] == ["zz-tool"]


def test_impact_counts_the_real_blast_radius() -> None:
    change = PackageChange("libssl", "3.0.1", "3.0.2", True)
    impact = assess_impact(
        {"staging": {"s1": [change]}, "production": {"p1": [change], "p2": []}},
        hosts_total=6,
        services=["web"],
        at=NOW,
    )
    assert impact.hosts_touched == 2 and impact.blast_radius == "2/6 hosts (33%)"
    assert impact.security_updates == 2 and impact.other_updates == 0
    assert [r["host"] for r in impact.rows] == ["p1", "s1"]


def installed(**versions: str) -> dict[str, InstalledPackage]:
    out = {}
    for name, text in versions.items():
        version, _, status = text.partition("/")
        out[name.replace("_", "-")] = InstalledPackage(
            name.replace("_", "-"), version, status or "ii"
        )
    return out


@pytest.mark.parametrize(
    ("after", "ok", "failed"),
    [
        (installed(kmp_agent="2.1-1"), True, []),
        (installed(kmp_agent="2.1-1/iF"), False, ["kmp-agent"]),  # postinst failed
        (installed(kmp_agent="2.0-1"), False, ["kmp-agent"]),  # not changed
        ({}, False, ["kmp-agent"]),
    ],
)
def test_verification_reads_back(after, ok, failed) -> None:
    change = PackageChange("kmp-agent", "2.0-1", "2.1-1")
    check = verify_host("h1", [change], installed(kmp_agent="2.0-1"), after)
    assert (check.ok, check.failed) == (ok, failed)


@pytest.mark.parametrize(
    ("before", "after", "back", "cannot"),
    [
        (installed(a="1"), installed(a="2/iF"), [("a", "2", "1")], []),
        (installed(a="1"), installed(a="2"), [("a", "2", "1")], []),
        (installed(a="1"), installed(a="1"), [], []),  # untouched: nothing to do
        ({}, installed(a="2/iF"), [], ["a"]),  # new package: a person decides
        ({}, {}, [], []),
    ],
)
def test_revert_goes_back_to_the_old_versions(before, after, back, cannot) -> None:
    changes = [PackageChange("a", "1", "2")]
    got_back, got_cannot = revert_changes(changes, before, after)
    assert [(c.package, c.from_version, c.to_version) for c in got_back] == back
    assert got_cannot == cannot


def test_overdue_security_from_release_date_or_first_seen() -> None:
    fresh = PendingUpdate("libfresh", "1", "2", True, released=NOW - timedelta(days=2))
    old = PendingUpdate("libold", "1", "2", True, released=NOW - timedelta(days=30))
    unseen = PendingUpdate("libseen", "1", "2", True)
    never = PendingUpdate("libnever", "1", "2", True)
    other = PendingUpdate("tool", "1", "2", False, released=NOW - timedelta(days=300))
    st = state(pending=[fresh, old, unseen, never, other])
    overdue, ages = overdue_security(
        [st, state(host="x", env="lab", pending=[old])],
        sla_days={"production": 7},
        first_seen={("h1", "libseen", "2"): NOW - timedelta(days=10)},
        now=NOW,
    )
    assert [(o.package, o.age_days, o.measured_from) for o in overdue] == [
        ("libold", 30.0, "release"),
        ("libseen", 10.0, "first seen"),
    ]
    assert {u.package for _, u, _ in ages} == {"libfresh", "libold", "libseen"}


APT = PackagesConfig(
    apt_config="{root}/etc/apt/kmpops-apt.conf",
    dpkg_admindir="{root}/var/lib/dpkg",
    reboot_required_file="{root}/var/run/reboot-required",
)


def test_apt_commands_carry_the_hosts_private_state() -> None:
    m = PackageManager(APT, {"root": "/srv/h1"})
    conf = ["-c", "/srv/h1/etc/apt/kmpops-apt.conf"]
    assert m.refresh_argv() == ["/usr/bin/apt-get", *conf, "-q", "update"]
    assert m.pending_argv() == ["/usr/bin/apt-get", *conf, "-s", "-q", "upgrade"]
    assert m.installed_argv()[:2] == ["/usr/bin/dpkg-query", "--admindir=/srv/h1/var/lib/dpkg"]
    assert m.install_argv([PackageChange("a", "1", "2")])[-2:] == ["--", "a=2"]
    assert "--allow-downgrades" in m.downgrade_argv([PackageChange("a", "2", "1")])
    assert "[ -e /srv/h1/var/run/reboot-required ]" in m.reboot_command()
    with pytest.raises(UnsafeValueError):
        PackageManager(APT, {"root": "/srv/h 1; id"}).refresh_argv()


def sudo_matches(rule: str, argv: list[str]) -> bool:
    """How sudo matches a rule ``PROGRAM ^REGEX$`` or ``PROGRAM WORDS`` (sudoers escapes
    undone, arguments joined by spaces)."""
    program, _, args = rule.partition(" ")
    if program != argv[0]:
        return False
    joined = " ".join(argv[1:])
    if args.startswith("^"):
        return re.fullmatch(args[1:-1].replace("\\:", ":").replace("\\=", "="), joined) is not None
    return args.replace("\\", "") == joined


@pytest.mark.parametrize(
    ("specs", "allowed"),
    [
        (["kmp-tool=1.1-1"], True),
        (["kmp-tool=1.1-1", "libssl3=3.0.11-1~deb12u2", "x=2:1.0+dfsg"], True),
        (["kmp-tool=1.1-1", "-oAPT::Update::Pre-Invoke::=id"], False),
        (["kmp-tool"], False),
        (["kmp-tool=1.1-1 -oDPkg::Pre-Invoke::=id"], False),
    ],
)
def test_sudo_rules_allow_exactly_name_version_words(specs, allowed) -> None:
    m = PackageManager(APT, {"root": "/srv/h1"})
    rules = m.sudo_rules()
    assert rules[0] == "/usr/bin/apt-get -c /srv/h1/etc/apt/kmpops-apt.conf -q update"
    head = m.install_argv([PackageChange("a", None, "1")])[:-1]
    assert any(sudo_matches(r, [*head, *specs]) for r in rules) is allowed


def test_configured_manager_commands() -> None:
    cfg = PackagesConfig(
        manager="command",
        commands={
            "refresh": "/usr/bin/dnf -q makecache",
            "pending": "/usr/local/bin/pending-updates",
            "installed": "/usr/local/bin/installed-packages",
            "install": "/usr/bin/dnf -y install {packages}",
            "downgrade": "/usr/bin/dnf -y downgrade {packages}",
            "package_format": "{package}-{version}",
        },
    )
    m = PackageManager(cfg, {"root": "/"})
    assert m.install_argv([PackageChange("openssl", None, "3.0.7")]) == [
        "/usr/bin/dnf",
        "-y",
        "install",
        "openssl-3.0.7",
    ]
    rules = m.sudo_rules()
    assert rules[0] == "/usr/bin/dnf -q makecache"
    assert sudo_matches(rules[1], ["/usr/bin/dnf", "-y", "install", "openssl-3.0.7"])
    assert not sudo_matches(rules[1], ["/usr/bin/dnf", "-y", "install", "--nogpgcheck"])
    with pytest.raises(ValueError, match="needs the word"):
        PackagesConfig(
            manager="command",
            commands={"pending": "/p", "installed": "/i", "install": "/usr/bin/dnf install"},
        )
    with pytest.raises(ValueError, match="absolute path"):
        PackagesConfig(
            manager="command",
            commands={"pending": "p", "installed": "/i", "install": "/d {packages}"},
        )
