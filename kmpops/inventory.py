"""Read an Ansible inventory (INI or YAML) into ops.yaml host entries: pure parsing, no I/O but
the file read, no Ansible, no Prefect.

``parse_inventory(text, fmt)`` returns an :class:`Inventory`: groups with their hosts, children
and vars, hosts with their own vars, each remembering the line it came from.
``map_environments(inventory, groups, defaults)`` turns chosen groups into environments: every
host of the group or of its descendants, its variables merged the way Ansible does (``all``, then
groups from the shallowest to the deepest — ties by name —, then the host's own), then mapped:

=================================================  ==========================================
Ansible variable                                   ops.yaml host field
=================================================  ==========================================
``ansible_host`` / ``ansible_ssh_host``            ``address`` (default: the inventory name)
``ansible_port`` / ``ansible_ssh_port``            ``port``
``ansible_user`` / ``ansible_ssh_user``            ``user``
``ansible_ssh_private_key_file``                   ``key_file``
``ansible_ssh_common_args`` (``-J`` / ProxyJump)   ``jump``
``ansible_connection`` (``ssh``/``smart``/         (checked; anything else is an error)
``paramiko``)
other names (identifiers, str/int/bool values)     ``vars``
=================================================  ==========================================

``ansible_become`` / ``ansible_become_user`` map to ``become`` / ``become_user`` and
``ansible_become_method`` must be ``sudo`` (kmp-ops becomes through ``sudo -n`` only);
``ansible_become_flags`` and interpreter/shell settings are reported as not mapped. A password
in the inventory (``ansible_password``, ``ansible_ssh_pass``, ``ansible_become_password``…),
an unknown ``ansible_*`` variable, a bad port, an unsafe name or
address, a non-scalar value for a mapped field or a malformed line is an :class:`InventoryError`
naming the file's line. Nothing is half-mapped: the first problem stops the import.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kmpops.errors import KmpOpsError

__all__ = [
    "Inventory",
    "InventoryError",
    "InventoryGroup",
    "InventoryHost",
    "MappedEnvironment",
    "NotMapped",
    "detect_format",
    "load_inventory",
    "map_environments",
    "parse_inventory",
    "unimported_hosts",
]

InventoryFormat = Literal["ini", "yaml"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RANGE_RE = re.compile(r"\[(\d+):(\d+)(?::(\d+))?\]")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

_ADDRESS_KEYS = ("ansible_host", "ansible_ssh_host")
_PORT_KEYS = ("ansible_port", "ansible_ssh_port")
_USER_KEYS = ("ansible_user", "ansible_ssh_user", "ansible_remote_user")
_KEY_FILE_KEYS = ("ansible_ssh_private_key_file", "ansible_private_key_file")
_SECRET_KEYS = (
    "ansible_password",
    "ansible_ssh_pass",
    "ansible_ssh_password",
    "ansible_become_pass",
    "ansible_become_password",
    "ansible_sudo_pass",
)
# Known to Ansible, meaningless or not yet supported in kmp-ops: reported, not mapped.
_NOT_MAPPED = {
    "ansible_become_flags": "kmp-ops always runs sudo -n (no prompt) and takes no other flags",
    "ansible_become_exe": "kmp-ops runs the sudo in the login user's PATH",
    "ansible_python_interpreter": "kmp-ops runs no Python on hosts",
    "ansible_shell_type": "kmp-ops uses the login shell",
    "ansible_shell_executable": "kmp-ops uses the login shell",
    "ansible_ssh_extra_args": "only ProxyJump in ansible_ssh_common_args is read",
    "ansible_scp_extra_args": "kmp-ops copies files over SFTP",
    "ansible_sftp_extra_args": "kmp-ops copies files over SFTP",
    "ansible_ssh_pipelining": "kmp-ops keeps one connection per host",
    "ansible_ssh_executable": "kmp-ops speaks SSH itself (paramiko)",
    "ansible_host_key_checking": "host keys are always checked",
    "ansible_ssh_host_key_checking": "host keys are always checked",
}
_CONNECTIONS = ("ssh", "smart", "paramiko")


class InventoryError(KmpOpsError, ValueError):
    """An inventory that cannot be imported; the message names the file and line."""


@dataclass
class InventoryHost:
    """One host of the inventory: its own vars (with the line each came from)."""

    name: str
    line: int
    vars: dict[str, Any] = field(default_factory=dict)
    var_lines: dict[str, int] = field(default_factory=dict)


@dataclass
class InventoryGroup:
    """One group: its direct hosts, child groups and vars."""

    name: str
    line: int
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    var_lines: dict[str, int] = field(default_factory=dict)


@dataclass
class Inventory:
    """A parsed inventory: groups (``all`` always present) and hosts, by name."""

    source: str
    groups: dict[str, InventoryGroup] = field(default_factory=dict)
    hosts: dict[str, InventoryHost] = field(default_factory=dict)

    def group(self, name: str, line: int) -> InventoryGroup:
        """The group called ``name``, created (at ``line``) if new."""
        if name not in self.groups:
            self.groups[name] = InventoryGroup(name, line)
        return self.groups[name]

    def host(self, name: str, line: int) -> InventoryHost:
        """The host called ``name``, created (at ``line``) if new."""
        if name not in self.hosts:
            self.hosts[name] = InventoryHost(name, line)
        return self.hosts[name]

    def top_level_groups(self) -> list[str]:
        """Groups that are direct children of ``all`` (not ``all``/``ungrouped``), by name."""
        nested = {c for g in self.groups.values() if g.name != "all" for c in g.children}
        return sorted(
            name for name in self.groups if name not in ("all", "ungrouped") and name not in nested
        )

    def hosts_of(self, group: str) -> list[str]:
        """Every host of ``group`` and its descendants, in the order first listed."""
        seen: dict[str, None] = {}
        for name in self._descendants(group):
            for host in self.groups[name].hosts:
                seen.setdefault(host)
        if group == "all":
            for host in self.hosts:
                seen.setdefault(host)
        return list(seen)

    def _descendants(self, group: str) -> list[str]:
        order, stack, path = [], [group], set()
        while stack:
            name = stack.pop(0)
            if name in path:
                continue
            path.add(name)
            order.append(name)
            stack.extend(self.groups[name].children)
        return order

    def depth(self, group: str) -> int:
        """How far ``group`` is below ``all`` (``all`` 0, top-level groups 1, ...)."""
        if group == "all":
            return 0
        parents = [g.name for g in self.groups.values() if group in g.children]
        if not parents:
            return 1
        return 1 + max(self.depth(p) for p in parents if p != group)

    def groups_of(self, host: str) -> list[str]:
        """Every group ``host`` belongs to (directly or through children), with ``all``."""
        direct = {g.name for g in self.groups.values() if host in g.hosts}
        found = {"all"}
        for name in self.groups:
            if any(d in direct for d in self._descendants(name)):
                found.add(name)
        return sorted(found, key=lambda g: (self.depth(g), g))

    def host_vars(self, host: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The merged vars of ``host`` and, per var, where its value came from ("file:line")."""
        merged: dict[str, Any] = {}
        where: dict[str, str] = {}
        for name in self.groups_of(host):
            group = self.groups[name]
            for key, value in group.vars.items():
                merged[key] = value
                where[key] = f"{self.source}:{group.var_lines.get(key, group.line)}"
        entry = self.hosts[host]
        for key, value in entry.vars.items():
            merged[key] = value
            where[key] = f"{self.source}:{entry.var_lines.get(key, entry.line)}"
        return merged, where


def detect_format(text: str, path: str | Path | None = None) -> InventoryFormat:
    """``yaml`` for a .yml/.yaml file or a text whose first significant line is ``key:``."""
    if path is not None and Path(path).suffix.lower() in (".yml", ".yaml"):
        return "yaml"
    if path is not None and Path(path).suffix.lower() in (".ini", ".cfg"):
        return "ini"
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line == "---" or re.match(r"^[A-Za-z0-9_.-]+:\s*(#.*)?$", line):
            return "yaml"
        return "ini"
    return "ini"


def load_inventory(path: str | Path, fmt: InventoryFormat | None = None) -> Inventory:
    """Read and parse the inventory at ``path``; InventoryError if it cannot be read or parsed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc.strerror}") from None
    return parse_inventory(text, fmt or detect_format(text, path), source=str(path))


def parse_inventory(text: str, fmt: InventoryFormat, *, source: str = "inventory") -> Inventory:
    """Parse an inventory's text (``ini`` or ``yaml``); InventoryError naming the line."""
    if fmt == "ini":
        inventory = _parse_ini(text, source)
    elif fmt == "yaml":
        inventory = _parse_yaml(text, source)
    else:
        raise InventoryError(f"{source}: unknown inventory format {fmt!r} (ini or yaml)")
    _check_graph(inventory)
    return inventory


# -- INI -------------------------------------------------------------------------------------


def _expand(pattern: str, where: str) -> list[str]:
    """Ansible's numeric host ranges: ``web[01:03]`` → web01, web02, web03."""
    match = _RANGE_RE.search(pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise InventoryError(f"{where}: host pattern {pattern!r} is not a numeric range")
        return [pattern]
    start, end, step = match.group(1), match.group(2), int(match.group(3) or 1)
    if int(end) < int(start) or step < 1 or (int(end) - int(start)) // step > 9999:
        raise InventoryError(f"{where}: host range {match.group(0)} is not a usable range")
    width = len(start) if start.startswith("0") else 0
    names = []
    for number in range(int(start), int(end) + 1, step):
        middle = str(number).zfill(width)
        names += _expand(pattern[: match.start()] + middle + pattern[match.end() :], where)
    return names


def _ini_value(raw: str) -> Any:
    """An INI value as Ansible reads it: a Python literal if it is one (``22``, ``True``,
    ``'x'``), else the text itself (``true`` stays the string "true", as in Ansible)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def _ini_pairs(tokens: Sequence[str], where: str) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise InventoryError(f"{where}: {token!r} is not key=value")
        pairs[key] = _ini_value(value)
    return pairs


def _parse_ini(text: str, source: str) -> Inventory:
    inventory = Inventory(source)
    inventory.group("all", 0)
    inventory.group("ungrouped", 0)
    inventory.groups["all"].children.append("ungrouped")
    section, kind = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{source}:{number}"
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            match = re.fullmatch(r"\[([^\]:]+)(?::(vars|children|hosts))?\]", line)
            if match is None:
                raise InventoryError(f"{where}: {line!r} is not a section header")
            section, kind = match.group(1), match.group(2) or "hosts"
            _check_group_name(section, where)
            inventory.group(section, number)
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise InventoryError(f"{where}: {exc}") from None
        if not tokens:
            continue
        group = inventory.groups[section]
        if kind == "vars":
            key, sep, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise InventoryError(f"{where}: {line!r} is not key=value")
            group.vars[key] = _ini_value(value)
            group.var_lines[key] = number
        elif kind == "children":
            if len(tokens) != 1:
                raise InventoryError(f"{where}: a [{section}:children] line names one group")
            _check_group_name(tokens[0], where)
            inventory.group(tokens[0], number)
            if tokens[0] not in group.children:
                group.children.append(tokens[0])
        else:
            pairs = _ini_pairs(tokens[1:], where)
            for name in _expand(tokens[0], where):
                _check_host_name(name, where)
                host = inventory.host(name, number)
                host.vars.update(pairs)
                host.var_lines.update(dict.fromkeys(pairs, number))
                if name not in group.hosts:
                    group.hosts.append(name)
    # Top-level groups are children of all; hosts in no group stay in ungrouped.
    nested = {c for g in inventory.groups.values() for c in g.children}
    for name in inventory.groups:
        if name not in nested and name != "all":
            inventory.groups["all"].children.append(name)
    return inventory


# -- YAML ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader (no tags beyond YAML's own: ``!vault`` is refused)."""


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _mapping(node: yaml.Node | None, where: str, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null")):
        return []
    if not isinstance(node, yaml.MappingNode):
        raise InventoryError(f"{where}:{_line(node)}: {what} must be a mapping")
    return node.value


def _parse_yaml(text: str, source: str) -> Inventory:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise InventoryError(
            f"{source}{at}: malformed YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    finally:
        loader.dispose()
    inventory = Inventory(source)
    inventory.group("all", 0)
    pairs = _mapping(root, source, "the inventory")
    for key, value in pairs:
        _yaml_group(inventory, str(key.value), _line(key), value, loader, parent=None)
    if "all" in inventory.groups:
        nested = {c for g in inventory.groups.values() for c in g.children}
        for name in inventory.groups:
            if name not in nested and name != "all":
                inventory.groups["all"].children.append(name)
    return inventory


def _scalar(node: yaml.Node, loader: yaml.SafeLoader, where: str) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{where}: {getattr(exc, 'problem', exc)}") from None


def _yaml_group(
    inventory: Inventory,
    name: str,
    line: int,
    node: yaml.Node,
    loader: yaml.SafeLoader,
    parent: str | None,
) -> None:
    where = f"{inventory.source}:{line}"
    _check_group_name(name, where)
    group = inventory.group(name, line)
    if parent is not None and name not in inventory.groups[parent].children:
        inventory.groups[parent].children.append(name)
    for key, value in _mapping(node, inventory.source, f"group {name}"):
        section = str(key.value)
        at = f"{inventory.source}:{_line(key)}"
        if section == "hosts":
            for host_key, host_vars in _mapping(value, inventory.source, f"{name}.hosts"):
                host_where = f"{inventory.source}:{_line(host_key)}"
                for host_name in _expand(str(host_key.value), host_where):
                    _check_host_name(host_name, host_where)
                    host = inventory.host(host_name, _line(host_key))
                    if host_name not in group.hosts:
                        group.hosts.append(host_name)
                    for var_key, var_value in _mapping(
                        host_vars, inventory.source, f"host {host_name}"
                    ):
                        var_where = f"{inventory.source}:{_line(var_key)}"
                        host.vars[str(var_key.value)] = _scalar(var_value, loader, var_where)
                        host.var_lines[str(var_key.value)] = _line(var_key)
        elif section == "vars":
            for var_key, var_value in _mapping(value, inventory.source, f"{name}.vars"):
                var_where = f"{inventory.source}:{_line(var_key)}"
                group.vars[str(var_key.value)] = _scalar(var_value, loader, var_where)
                group.var_lines[str(var_key.value)] = _line(var_key)
        elif section == "children":
            for child_key, child in _mapping(value, inventory.source, f"{name}.children"):
                _yaml_group(
                    inventory, str(child_key.value), _line(child_key), child, loader, parent=name
                )
        else:
            raise InventoryError(
                f"{at}: unknown key {section!r} in group {name} (hosts, vars or children)"
            )


# -- checks ----------------------------------------------------------------------------------


def _check_group_name(name: str, where: str) -> None:
    if not _NAME_RE.match(name):
        raise InventoryError(f"{where}: group name {name!r} is not a safe name")


def _check_host_name(name: str, where: str) -> None:
    if not _NAME_RE.match(name):
        raise InventoryError(
            f"{where}: host name {name!r} is not a safe name (letters, digits, '.', '_', '-')"
        )


def _check_graph(inventory: Inventory) -> None:
    """Refuse a group that is its own descendant (Ansible refuses it too)."""
    for name, group in inventory.groups.items():
        stack, seen = list(group.children), set()
        while stack:
            child = stack.pop()
            if child == name:
                raise InventoryError(
                    f"{inventory.source}:{group.line}: group {name} is its own descendant"
                )
            if child not in seen:
                seen.add(child)
                stack.extend(inventory.groups[child].children)


# -- mapping ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotMapped:
    """A variable that was read but not carried into ops.yaml, and why."""

    host: str
    key: str
    where: str
    reason: str


@dataclass
class MappedEnvironment:
    """One environment built from a group: ops.yaml host entries and what was left out."""

    name: str
    group: str
    hosts: list[dict[str, Any]] = field(default_factory=list)
    not_mapped: list[NotMapped] = field(default_factory=list)


def _jump_from_args(args: str, where: str) -> list[dict[str, Any]]:
    """The hops of ``-J a,b`` / ``-o ProxyJump=a,b`` in ``ansible_ssh_common_args``."""
    try:
        tokens = shlex.split(args)
    except ValueError as exc:
        raise InventoryError(f"{where}: ansible_ssh_common_args: {exc}") from None
    spec: str | None = None
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "-J" and index + 1 < len(tokens):
            spec, index = tokens[index + 1], index + 2
            continue
        if token == "-o" and index + 1 < len(tokens):
            option = tokens[index + 1]
            index += 2
        elif token.startswith("-o"):
            option, index = token[2:], index + 1
        else:
            raise InventoryError(
                f"{where}: ansible_ssh_common_args: {token!r} is not supported (only -J or "
                "-o ProxyJump=...)"
            )
        key, _, value = option.replace(" ", "=", 1).partition("=")
        if key.lower() != "proxyjump":
            raise InventoryError(
                f"{where}: ansible_ssh_common_args: option {key!r} is not supported "
                "(only ProxyJump)"
            )
        spec = value
    if not spec:
        return []
    hops = []
    for hop in spec.split(","):
        match = re.fullmatch(r"(?:([^@]+)@)?([^:@\[\]]+|\[[^\]]+\])(?::(\d+))?", hop.strip())
        if match is None:
            raise InventoryError(f"{where}: jump host {hop!r} is not [user@]host[:port]")
        user, address, port = match.group(1), match.group(2).strip("[]"), match.group(3)
        entry: dict[str, Any] = {"address": _checked_address(address, where)}
        if user:
            entry["user"] = _checked_user(user, where)
        if port:
            entry["port"] = _checked_port(port, where)
        hops.append(entry)
    return hops


def _checked_address(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _ADDRESS_RE.match(value):
        raise InventoryError(f"{where}: {value!r} is not a host name or IP address")
    return value


def _checked_port(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise InventoryError(f"{where}: port {value!r} is not a number")
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InventoryError(f"{where}: port {value!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise InventoryError(f"{where}: port {port} is not between 1 and 65535")
    return port


def _checked_user(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _USER_RE.match(value):
        raise InventoryError(f"{where}: user {value!r} is not a safe user name")
    return value


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _checked_bool(value: Any, where: str, key: str) -> bool:
    """Ansible's booleans: true/false, yes/no, on/off, 1/0 (any case), or a YAML bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InventoryError(f"{where}: {key} {value!r} is not a boolean (true/false, yes/no)")


def _checked_path(value: Any, where: str, base: Path | None) -> str:
    if not isinstance(value, str) or not value or "\n" in value or "\x00" in value:
        raise InventoryError(f"{where}: {value!r} is not a file path")
    if "{{" in value or "{%" in value:
        raise InventoryError(f"{where}: {value!r} is a Jinja template; give the path itself")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path)


def _map_host(
    inventory: Inventory, name: str, base: Path | None
) -> tuple[dict[str, Any], list[NotMapped]]:
    merged, where = inventory.host_vars(name)
    entry: dict[str, Any] = {"name": name, "address": name}
    plain: dict[str, Any] = {}
    skipped: list[NotMapped] = []
    for key, value in merged.items():
        at = where[key]
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            if key.startswith("ansible_"):
                raise InventoryError(f"{at}: {key} is a Jinja template; kmp-ops needs its value")
            skipped.append(NotMapped(name, key, at, "a Jinja template is not evaluated"))
            continue
        if key in _ADDRESS_KEYS:
            entry["address"] = _checked_address(value, at)
        elif key in _PORT_KEYS:
            entry["port"] = _checked_port(value, at)
        elif key in _USER_KEYS:
            entry["user"] = _checked_user(value, at)
        elif key in _KEY_FILE_KEYS:
            entry["key_file"] = _checked_path(value, at, base)
        elif key == "ansible_ssh_common_args":
            if not isinstance(value, str):
                raise InventoryError(f"{at}: ansible_ssh_common_args must be a string")
            hops = _jump_from_args(value, at)
            if hops:
                entry["jump"] = hops
        elif key == "ansible_become":
            entry["become"] = _checked_bool(value, at, key)
        elif key == "ansible_become_user":
            entry["become_user"] = _checked_user(value, at)
        elif key == "ansible_become_method":
            if value != "sudo":
                raise InventoryError(
                    f"{at}: ansible_become_method {value!r} is not supported (kmp-ops becomes "
                    "through sudo -n only)"
                )
            entry["become_method"] = "sudo"
        elif key == "ansible_connection":
            if value not in _CONNECTIONS:
                raise InventoryError(
                    f"{at}: ansible_connection {value!r} is not supported "
                    f"(kmp-ops connects over SSH: {', '.join(_CONNECTIONS)})"
                )
        elif key in _SECRET_KEYS:
            raise InventoryError(
                f"{at}: {key} puts a password in the inventory; kmp-ops uses keys, an agent "
                "or a key passphrase reference (key_passphrase: env:NAME)"
            )
        elif key in _NOT_MAPPED:
            skipped.append(NotMapped(name, key, at, _NOT_MAPPED[key]))
        elif key.startswith("ansible_"):
            raise InventoryError(f"{at}: unknown Ansible variable {key}")
        elif not _VAR_RE.match(key):
            raise InventoryError(f"{at}: variable name {key!r} is not an identifier")
        elif isinstance(value, bool):
            plain[key] = "true" if value else "false"
        elif isinstance(value, int | str):
            plain[key] = value
        else:
            skipped.append(
                NotMapped(name, key, at, f"a {type(value).__name__} is not a host variable")
            )
    if plain:
        entry["vars"] = plain
    return entry, skipped


def map_environments(
    inventory: Inventory,
    groups: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    base: Path | None = None,
) -> list[MappedEnvironment]:
    """Environments from the inventory's groups: ``{group: environment name}`` (default: every
    top-level group under its own name). ``defaults`` are host fields (``known_hosts``,
    ``key_file``, ``agent``...) that inventory values override; ``base`` resolves relative key
    file paths (the inventory's directory). Raises InventoryError for an unknown group, a group
    without hosts, a host in two chosen groups, or any bad value (naming its line)."""
    base = Path(base).absolute() if base is not None else None
    chosen = dict(groups) if groups else {g: g for g in inventory.top_level_groups()}
    if not chosen:
        raise InventoryError(f"{inventory.source}: no groups to import")
    result: list[MappedEnvironment] = []
    owner: dict[str, str] = {}
    for group, env_name in chosen.items():
        if group not in inventory.groups:
            known = ", ".join(sorted(inventory.groups)) or "none"
            raise InventoryError(f"{inventory.source}: no group {group!r} (groups: {known})")
        if not _NAME_RE.match(env_name):
            raise InventoryError(f"environment name {env_name!r} is not a safe name")
        mapped = MappedEnvironment(env_name, group)
        names = inventory.hosts_of(group)
        if not names:
            raise InventoryError(
                f"{inventory.source}:{inventory.groups[group].line}: group {group} has no hosts"
            )
        for name in names:
            if name in owner:
                raise InventoryError(
                    f"{inventory.source}:{inventory.hosts[name].line}: host {name} is in both "
                    f"{owner[name]} and {env_name}"
                )
            owner[name] = env_name
            entry, skipped = _map_host(inventory, name, base)
            mapped.hosts.append({**dict(defaults or {}), **entry})
            mapped.not_mapped += skipped
        result.append(mapped)
    return result


def unimported_hosts(inventory: Inventory, environments: Sequence[MappedEnvironment]) -> list[str]:
    """Hosts of the inventory that none of ``environments`` took (ungrouped hosts, hosts of
    groups not chosen), as "name (file:line)", in inventory order: the import reports them."""
    taken = {h["name"] for env in environments for h in env.hosts}
    return [
        f"{name} ({inventory.source}:{host.line})"
        for name, host in inventory.hosts.items()
        if name not in taken
    ]
