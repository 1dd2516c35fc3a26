"""Privilege escalation for the few commands that need root: ``sudo -n``, never a prompt.

A host with ``become: true`` (its own, or its environment's) runs the commands a service lists
in ``become_commands`` (``restart`` by default) as ``become_user`` through
``sudo -n -u USER -- ARGV``. The command is rendered to words (``shellsafe.render_argv``) and
every word is quoted, so a sudo rule naming exactly those words matches and nothing else runs
as root. ``-n`` makes sudo fail at once instead of asking for a password, and the SSH session
never has a terminal (``SSHConnection.run`` requests no pty), so a missing rule is an error
(:class:`~kmpops.errors.PrivilegeRefused` naming the host, the command and the user), never a
hang.

:func:`sudoers_rules` writes the rules an environment needs (``kmpops sudoers ENV``), one line
per host and command, validated by the caller with ``visudo -cf``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from kmpops import shellsafe
from kmpops.errors import PrivilegeRefused, UnsafeValueError

if TYPE_CHECKING:
    from kmpops.config import Environment, Host, OpsConfig, ServiceConfig
    from kmpops.connectors.ssh import CommandResult

__all__ = [
    "Become",
    "CommandKind",
    "become_of",
    "check_sudo",
    "refusal",
    "refused_error",
    "refused_shell_command",
    "service_become_argvs",
    "service_command",
    "sudo_argv",
    "sudoers_rules",
]

CommandKind = Literal["restart", "drain", "undrain", "block_address"]

# What sudo -n prints when it would have to ask (no NOPASSWD rule matches), or refuses outright.
_REFUSALS = (
    re.compile(r"sudo: a password is required"),
    re.compile(r"sudo: a terminal is required"),
    re.compile(r"is not allowed to (?:execute|run sudo)"),
    re.compile(r"is not in the sudoers file"),
    re.compile(r"may not run sudo"),
)
_SUDO_LINE = re.compile(r"^sudo: .*$", re.MULTILINE)


@dataclass(frozen=True)
class Become:
    """Run as ``user`` through ``method`` (sudo only)."""

    user: str = "root"
    method: Literal["sudo"] = "sudo"

    def __post_init__(self) -> None:
        shellsafe.validate_name(self.user, what="become_user")
        if self.method != "sudo":
            raise UnsafeValueError(f"become_method {self.method!r}: only sudo is supported")


def become_of(host: Host) -> Become | None:
    """The host's privilege escalation (None: ``become`` is off)."""
    return Become(host.become_user, host.become_method) if host.become else None


def sudo_argv(argv: Sequence[str], become: Become) -> list[str]:
    """``sudo -n -u USER -- ARGV``: never prompts, never reads a password, no shell."""
    if not argv:
        raise UnsafeValueError("a become command needs at least one word")
    return ["sudo", "-n", "-u", become.user, "--", *argv]


def refusal(stderr: str) -> str | None:
    """sudo's own line if ``stderr`` says sudo -n refused (no rule, a password or a terminal
    needed); None otherwise (the command itself ran, whatever its exit status)."""
    if not any(pattern.search(stderr) for pattern in _REFUSALS):
        return None
    lines = _SUDO_LINE.findall(stderr)
    return (lines[-1] if lines else stderr.strip().splitlines()[-1]).strip()


def refused_error(host: str, user: str, command: str, why: str) -> PrivilegeRefused:
    """The error for a command sudo -n refused: the host, the command, the user, sudo's words,
    and where the rules come from."""
    return PrivilegeRefused(
        f"host {host}: sudo -n refused to run {command!r} as {user} ({why}): no sudo rule lets "
        "the login user run exactly this command without a password; install the rules "
        "`kmpops sudoers ENVIRONMENT` prints"
    )


def refused_shell_command(host: str, command: str, why: str) -> PrivilegeRefused:
    """:func:`refused_error` for a rendered command line (``sudo -n -u USER -- WORDS`` as
    :func:`service_command` writes it): the user and the words are read back from it."""
    match = re.fullmatch(r"sudo -n -u (\S+) -- (.+)", command.strip(), re.DOTALL)
    if match is None:
        return refused_error(host, "another user", command, why)
    return refused_error(host, match.group(1), match.group(2), why)


def service_command(
    service: ServiceConfig,
    kind: CommandKind,
    host: Host,
    values: Mapping[str, str | int],
) -> str:
    """The service's ``kind`` command for ``host``, rendered for the login shell.

    Without become (or if ``kind`` is not in ``service.become_commands``) this is
    ``shellsafe.render_command``. With become it is ``sudo -n -u USER -- WORDS``, the words from
    ``shellsafe.render_argv`` each quoted. Raises UnsafeValueError if the service has no such
    command, or (with become) if it is not one simple command starting with an absolute path.
    """
    template = getattr(service, kind)
    if template is None:
        raise UnsafeValueError(f"the service has no {kind} command")
    become = become_of(host)
    if become is None or kind not in service.become_commands:
        return shellsafe.render_command(template, values)
    argv = render_become_argv(template, values, what=kind)
    return shellsafe.join(sudo_argv(argv, become))


def render_become_argv(template: str, values: Mapping[str, str | int], *, what: str) -> list[str]:
    """The words of a become command (``shellsafe.render_argv``), the first an absolute path."""
    argv = shellsafe.render_argv(template, values)
    if not argv[0].startswith("/"):
        raise UnsafeValueError(
            f"{what}: {argv[0]!r} is not an absolute path (a sudo rule names the program by "
            "its full path)"
        )
    shellsafe.validate_absolute_path(argv[0], what=what)
    return argv


def service_become_argvs(service: ServiceConfig, host: Host) -> list[list[str]]:
    """The words of each of the service's become commands on ``host`` ([] without become)."""
    if become_of(host) is None:
        return []
    values = {**host.template_values(), "deploy_path": service.deploy_path_for(host)}
    return [
        render_become_argv(template, values, what=kind)
        for kind in service.become_commands
        if (template := getattr(service, kind)) is not None
    ]


class _Runner(Protocol):
    """What :func:`check_sudo` needs of a connection (``SSHConnection.run``)."""

    name: str

    def run(self, command: Sequence[str], *, timeout: float) -> CommandResult: ...


def check_sudo(conn: _Runner, host: Host, commands: Sequence[Sequence[str]]) -> list[str]:
    """Ask sudo, without running anything, whether the login user may run each of ``commands``
    (word lists, as :func:`render_become_argv` gives) as the host's become_user without a
    password (``sudo -n -l -u USER -- WORDS``, one round trip per command, 30 s each at most).

    Returns the commands that could not be checked because their program does not exist yet
    (a first install: ``current`` is switched later); raises PrivilegeRefused naming the host
    and the first command sudo refuses. Changes nothing on the host.
    """
    become = become_of(host)
    if become is None:
        return []
    unchecked: list[str] = []
    for argv in commands:
        listed = ["sudo", "-n", "-l", "-u", become.user, "--", *argv]
        result = conn.run(listed, timeout=30)
        if result.exit_status == 0:
            continue
        text = shellsafe.join(list(argv))
        if "command not found" in result.stderr:
            unchecked.append(text)
            continue
        why = refusal(result.stderr) or (
            result.stderr.strip().splitlines()[-1]
            if result.stderr.strip()
            else "sudo -n -l lists no rule for it"
        )
        raise refused_error(conn.name, become.user, text, why)
    return unchecked


# Characters sudoers takes literally in a command's words; ``,:=\`` need a backslash; anything
# else (spaces, globs, quotes) cannot be written as an exact rule.
_SUDOERS_PLAIN = re.compile(r"[A-Za-z0-9._+@%/-]")
_SUDOERS_ESCAPE = set(",:=")


def _sudoers_word(word: str, *, what: str) -> str:
    out = []
    for ch in word:
        if _SUDOERS_PLAIN.fullmatch(ch):
            out.append(ch)
        elif ch in _SUDOERS_ESCAPE:
            out.append("\\" + ch)
        else:
            raise UnsafeValueError(
                f"{what}: {word!r} cannot be written as an exact sudoers rule ({ch!r})"
            )
    return "".join(out)


def sudoers_rules(
    cfg: OpsConfig,
    environment: str,
    *,
    login_user: str | None = None,
    extra: Mapping[str, Sequence[Sequence[str]]] | None = None,
) -> str:
    """The sudoers text (for ``/etc/sudoers.d/``) that lets each host's login user run exactly
    its become commands, for every service, as the host's become_user without a password.

    One ``User_Alias``-free line per (host, command), commented with the host's name, so one
    file can serve every host of the environment (each host matches its own lines; the paths
    differ per host only if the hosts' vars differ). An environment with ``packages`` gets the
    package manager's root commands (``PackageManager.sudo_rules``: the refresh word for word,
    install and downgrade as sudo regular expressions over ``NAME=VERSION`` words). ``extra``
    adds commands by host name. ``login_user`` replaces the hosts' ``user`` (a fleet
    where the deploy user differs from ops.yaml's). Raises UnsafeValueError for a word sudoers
    cannot express exactly, NotFound-like KeyError for an unknown environment. Hosts without
    become get no lines (a comment says so). Validate the result with ``visudo -cf`` before
    installing it.
    """
    env: Environment = cfg.environment(environment)
    lines = [
        f"# kmp-ops: sudo rules for environment {environment} (generated by `kmpops sudoers "
        f"{environment}`).",
        "# Install with: visudo -cf FILE && install -m 0440 FILE /etc/sudoers.d/kmpops",
        "# Each rule names one command with its exact arguments; nothing else runs as root.",
    ]
    for host in env.hosts:
        become = become_of(host)
        if become is None:
            lines.append(f"# {host.name}: become is off, no rules")
            continue
        user = _sudoers_word(login_user or host.user, what="login user")
        target = _sudoers_word(become.user, what="become_user")
        commands: list[tuple[str, list[str]]] = []
        for svc_name, svc in cfg.services.items():
            values = {**host.template_values(), "deploy_path": svc.deploy_path_for(host)}
            for kind in svc.become_commands:
                template = getattr(svc, kind)
                if template is not None:
                    argv = render_become_argv(template, values, what=f"{svc_name}.{kind}")
                    commands.append((f"{svc_name} {kind}", argv))
                    if _under(argv[0], values["deploy_path"]):
                        lines.append(
                            f"# WARNING {host.name}: {argv[0]} lies under the deploy path, which "
                            f"the login user owns: this rule gives it root. Point {svc_name}."
                            f"{kind} at a root-owned program (systemctl restart UNIT) on a real "
                            "fleet."
                        )
        for argv in (extra or {}).get(host.name, []):
            commands.append(("extra command", list(argv)))
        for label, argv in commands:
            words = " ".join(_sudoers_word(w, what=label) for w in argv)
            lines.append(f"# {host.name}: {label}")
            lines.append(f"{user} ALL=({target}) NOPASSWD: {words}")
        if env.packages is not None:
            from kmpops.packages import PackageManager

            manager = PackageManager(env.packages, host.template_values())
            for spec in manager.sudo_rules():
                lines.append(f"# {host.name}: package manager ({env.packages.manager})")
                lines.append(f"{user} ALL=({target}) NOPASSWD: {spec}")
    return "\n".join(lines) + "\n"


def _under(path: str, root: str | int) -> bool:
    root_text = str(root).rstrip("/")
    return path == root_text or path.startswith(root_text + "/")
