"""The ``ops.yaml`` configuration: pydantic models, loading and validation with field paths.

``load_config(path)`` returns an :class:`OpsConfig` or raises :class:`~kmpops.errors.ConfigError`
whose ``problems`` name each bad field (``environments.production.hosts[2].port: …``). Unknown
keys are errors. Secrets are references (``env:NAME``, ``file:/path``, ``prefect:block``) or
literal values kept as :class:`pydantic.SecretStr`; neither is ever echoed.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from kmpops.errors import ConfigError, UnsafeValueError
from kmpops.plans.alerts import parse_duration, parse_threshold

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SECRET_REF_RE = re.compile(r"^(env|file|prefect):(.+)$")
SEVERITIES = ("critical", "warning", "info")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Strict(BaseModel):
    """Base model: unknown keys are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a safe name (letters, digits, '.', '_', '-'; starts with a "
            "letter or digit; at most 63 characters)"
        )
    return value


Name = Annotated[str, BeforeValidator(_check_name)]


def _to_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"expected a duration such as '5m' or '30d', got {value!r}")


Duration = Annotated[timedelta, BeforeValidator(_to_duration)]


class SecretRef(BaseModel):
    """A secret: a reference resolved at run time, or a literal value that is never echoed."""

    model_config = ConfigDict(frozen=True)

    scheme: Literal["env", "file", "prefect", "literal"]
    target: str = ""
    literal: SecretStr | None = None

    @classmethod
    def parse(cls, value: Any) -> SecretRef:
        """Build from ``env:NAME`` / ``file:/path`` / ``prefect:block`` or a literal string."""
        if isinstance(value, SecretRef):
            return value
        if isinstance(value, SecretStr):
            return cls(scheme="literal", literal=value)
        if not isinstance(value, str) or not value:
            raise ValueError("expected a secret reference (env:NAME, file:/path, prefect:block)")
        match = SECRET_REF_RE.match(value)
        if match:
            return cls(scheme=match.group(1), target=match.group(2))  # type: ignore[arg-type]
        return cls(scheme="literal", literal=SecretStr(value))

    def __str__(self) -> str:
        return "**********" if self.scheme == "literal" else f"{self.scheme}:{self.target}"

    __repr__ = __str__


Secret = Annotated[SecretRef, BeforeValidator(SecretRef.parse)]


def _check_credentials(model: Host | JumpHost) -> None:
    if model.key_file is None and not model.agent:
        raise ValueError("give key_file, or agent: true")
    if model.certificate is not None and model.key_file is None:
        raise ValueError("a certificate needs the key_file it certifies")
    if model.key_passphrase is not None and model.key_file is None:
        raise ValueError("key_passphrase needs a key_file")
    if model.agent_socket is not None and not model.agent:
        raise ValueError("agent_socket needs agent: true")


class JumpHost(Strict):
    """One bastion hop on the way to a host (like OpenSSH's ProxyJump). Its host key is checked
    in ``known_hosts`` (default: the host's); credentials default to the host's own."""

    address: str = Field(min_length=1, max_length=253)
    port: int = Field(default=22, ge=1, le=65535)
    user: Name | None = None
    key_file: Path | None = None
    key_passphrase: Secret | None = None
    certificate: Path | None = None
    agent: bool = False
    agent_socket: Path | None = None
    known_hosts: Path | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$", value):
            raise ValueError(f"{value!r} is not a host name or IP address")
        return value

    @model_validator(mode="after")
    def _hop_credentials(self) -> JumpHost:
        if self.key_file is not None or self.agent:
            _check_credentials(self)
        elif self.certificate is not None or self.key_passphrase is not None:
            raise ValueError("certificate and key_passphrase need the hop's own key_file")
        return self


class Host(Strict):
    """One machine reached over SSH."""

    name: Name
    address: str = Field(min_length=1, max_length=253)
    port: int = Field(default=22, ge=1, le=65535)
    user: Name = "root"
    key_file: Path | None = None
    known_hosts: Path
    vars: dict[str, str | int] = Field(default_factory=dict)
    key_passphrase: Secret | None = Field(
        default=None, description="passphrase of an encrypted key_file (env:NAME, file:/path)"
    )
    certificate: Path | None = Field(
        default=None, description="OpenSSH user certificate of the key (ssh-keygen -s)"
    )
    agent: bool = Field(default=False, description="offer the ssh-agent's keys ($SSH_AUTH_SOCK)")
    agent_socket: Path | None = Field(default=None, description="the agent's socket (agent: true)")
    jump: list[JumpHost] = Field(default_factory=list, description="bastion hops, in order")
    become: bool = Field(
        default=False,
        description="run the services' become_commands as become_user through sudo -n "
        "(default: the environment's become)",
    )
    become_user: Name = "root"
    become_method: Literal["sudo"] = "sudo"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$", value):
            raise ValueError(f"{value!r} is not a host name or IP address")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> Host:
        _check_credentials(self)
        return self

    @field_validator("vars")
    @classmethod
    def _vars(cls, value: dict[str, str | int]) -> dict[str, str | int]:
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"variable name {key!r} must be an identifier")
        _check_path_vars(value)
        return value

    def template_values(self) -> dict[str, str | int]:
        """Values a service template may use: ``name``, ``address``, ``port`` and ``vars``."""
        return {"name": self.name, "address": self.address, "ssh_port": self.port, **self.vars}


class FreezeWindow(Strict):
    """A period in which changes are refused: absolute (start/end) or weekly (days + from/to)."""

    name: Name
    start: datetime | None = None
    end: datetime | None = None
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=list
    )
    from_: time | None = Field(default=None, alias="from")
    to: time | None = None
    tz: str = "UTC"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _shape(self) -> FreezeWindow:
        absolute = self.start is not None or self.end is not None
        weekly = bool(self.days) or self.from_ is not None or self.to is not None
        if absolute == weekly:
            raise ValueError("give either start+end or days+from+to")
        if absolute and (self.start is None or self.end is None or self.end <= self.start):
            raise ValueError("start and end are both required and end must be after start")
        if weekly and (not self.days or self.from_ is None or self.to is None):
            raise ValueError("a weekly window needs days, from and to")
        return self


class Policy(Strict):
    """How changes to an environment are approved and rolled out."""

    approval_required: bool = False
    approvers: list[Name] = Field(default_factory=list)
    four_eyes: bool = True
    quorum: int = Field(default=1, ge=1, le=10)
    approval_timeout: Duration = timedelta(hours=1)
    timeout_outcome: Literal["reject", "approve"] = "reject"
    approver_tokens: Secret | None = None
    batch_size: str | int = "25%"
    max_failures: int = Field(default=0, ge=0)
    bake_time: Duration = timedelta(seconds=0)
    auto_containment: list[Literal["critical", "warning", "info"]] = Field(default_factory=list)
    freeze_windows: list[FreezeWindow] = Field(default_factory=list)
    inconclusive: Literal["fail", "pause"] = Field(
        default="fail", description="an inconclusive analysis fails, or pauses for a decision"
    )

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: str | int) -> str | int:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("batch_size must be at least 1")
            return value
        match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value.strip())
        if not match or not 0 < float(match.group(1)) <= 100:
            raise ValueError(f"{value!r} is not a host count or a percentage in (0%, 100%]")
        return value.strip()

    @model_validator(mode="after")
    def _approvers(self) -> Policy:
        if self.approval_required and len(self.approvers) < self.quorum:
            raise ValueError(
                f"quorum {self.quorum} needs at least {self.quorum} approvers, "
                f"{len(self.approvers)} listed"
            )
        if self.approval_required and self.approver_tokens is None:
            raise ValueError(
                "approval_required needs approver_tokens (a token book): without one an "
                "answer cannot be authenticated and anyone could approve"
            )
        return self


class HostDefaults(Strict):
    """Connection fields for the hosts read from an inventory (the inventory's values win)."""

    port: int | None = Field(default=None, ge=1, le=65535)
    user: Name | None = None
    key_file: Path | None = None
    key_passphrase: Secret | None = None
    certificate: Path | None = None
    agent: bool | None = None
    agent_socket: Path | None = None
    known_hosts: Path | None = None
    jump: list[JumpHost] | None = None
    become: bool | None = None
    become_user: Name | None = None


_BECOME_FIELDS = ("become", "become_user", "become_method")


class InventorySource(Strict):
    """An Ansible inventory read live when ops.yaml is loaded (``kmpops.inventory``): the hosts
    of ``group`` (default: the environment's name) and its descendants join ``hosts``."""

    path: Path
    format: Literal["ini", "yaml"] | None = None
    group: Name | None = None
    defaults: HostDefaults = HostDefaults()


class PackageCommands(Strict):
    """A package manager other than apt (``packages.manager: command``): one command template
    per operation, each one simple command of plain words (run without a shell; placeholders
    from the host's vars), the first an absolute path.

    ``pending`` prints one line per pending update: ``NAME INSTALLED CANDIDATE security|other
    [RELEASED]`` (RELEASED an ISO date, optional); ``installed`` one line per installed package:
    ``NAME VERSION [ok|broken]``. ``install`` and ``downgrade`` hold the word ``{packages}``,
    replaced by one word per package (``package_format``, default ``{package}={version}``).
    ``refresh``, ``install`` and ``downgrade`` run as root through become; ``pending`` and
    ``installed`` as the login user."""

    refresh: str | None = None
    pending: str
    installed: str
    install: str
    downgrade: str | None = None
    package_format: str = "{package}={version}"

    @model_validator(mode="after")
    def _shape(self) -> PackageCommands:
        from kmpops.shellsafe import render_argv

        for name in ("refresh", "pending", "installed", "install", "downgrade"):
            template = getattr(self, name)
            if template is None:
                continue
            sample = {k: "x" for k in _PLACEHOLDER_RE.findall(template)}
            try:
                argv = render_argv(template, sample)
            except UnsafeValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if not argv[0].startswith("/"):
                raise ValueError(f"{name}: {template!r} must start with an absolute path")
            if name in ("install", "downgrade") and "{packages}" not in template.split():
                raise ValueError(f"{name}: {template!r} needs the word {{packages}}")
        if set(_PLACEHOLDER_RE.findall(self.package_format)) != {"package", "version"}:
            raise ValueError("package_format needs {package} and {version}")
        return self


class PatchPolicy(Strict):
    """How fast updates must be applied: a pending security update older than
    ``security_sla_days`` (from its repository's Release date, else from when kmp-ops first
    saw it pending) is a compliance finding and fires the ``security_patch_sla`` alert."""

    security_sla_days: int = Field(default=7, ge=0, le=3650)
    alert_severity: Literal["critical", "warning", "info"] = "warning"


class PackagesConfig(Strict):
    """The hosts' package manager (``environments.<env>.packages``), for patch-hosts.

    ``apt`` (the default) runs ``apt_get`` / ``dpkg_query``; ``apt_config`` (a path template,
    e.g. ``{root}/etc/apt/kmpops-apt.conf``) is passed as ``-c`` to every apt command and
    ``dpkg_admindir`` as dpkg-query's ``--admindir`` (a host with its own package state; omit
    both on a real host). ``command`` runs ``commands``. Commands that change packages run as
    root through the host's become (``sudo -n``; ``kmpops sudoers ENV`` prints their exact
    rules). ``services`` are health-checked after each host is patched (default: every
    service); ``reboot_required_file`` is what tells a host needs a reboot."""

    manager: Literal["apt", "command"] = "apt"
    apt_get: str = "/usr/bin/apt-get"
    dpkg_query: str = "/usr/bin/dpkg-query"
    apt_config: str | None = None
    dpkg_admindir: str | None = None
    commands: PackageCommands | None = None
    reboot_required_file: str = "/var/run/reboot-required"
    services: list[Name] | None = None
    timeout: Duration = timedelta(minutes=15)
    policy: PatchPolicy = PatchPolicy()

    @field_validator("apt_get", "dpkg_query")
    @classmethod
    def _program(cls, value: str) -> str:
        from kmpops.shellsafe import validate_absolute_path

        try:
            return validate_absolute_path(value, what="program")
        except UnsafeValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("apt_config", "dpkg_admindir", "reboot_required_file")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        if value is not None:
            _check_path_template(value, what="path")
        return value

    @model_validator(mode="after")
    def _manager(self) -> PackagesConfig:
        if self.manager == "command" and self.commands is None:
            raise ValueError("manager command needs commands")
        if self.manager == "apt" and self.commands is not None:
            raise ValueError("commands are for manager: command (apt's are built in)")
        return self


class Environment(Strict):
    """A set of hosts with one policy (development, staging, production)."""

    hosts: list[Host] = Field(default_factory=list)
    policy: Policy = Policy()
    inventory: InventorySource | None = None
    packages: PackagesConfig | None = Field(
        default=None, description="the hosts' package manager and patch policy (patch-hosts)"
    )
    become: bool = Field(
        default=False,
        description="privilege escalation for the services' become_commands on every host "
        "(a host's own become, become_user, become_method win); sudo -n only, never a prompt",
    )
    become_user: Name = "root"
    become_method: Literal["sudo"] = "sudo"

    @model_validator(mode="before")
    @classmethod
    def _hosts_inherit_become(cls, data: Any) -> Any:
        """A host without its own ``become*`` fields takes the environment's (like Ansible's
        group vars); the hosts are validated afterwards, with the rest."""
        if not isinstance(data, dict) or not any(k in data for k in _BECOME_FIELDS):
            return data
        inherited = {k: data[k] for k in _BECOME_FIELDS if k in data}
        hosts = []
        for host in data.get("hosts") or []:
            if isinstance(host, dict):
                hosts.append({**inherited, **host})
            elif isinstance(host, Host):
                own = host.model_fields_set & set(_BECOME_FIELDS)
                hosts.append(
                    host.model_copy(update={k: v for k, v in inherited.items() if k not in own})
                )
            else:
                hosts.append(host)
        return {**data, "hosts": hosts}

    @model_validator(mode="after")
    def _unique_hosts(self) -> Environment:
        names = [h.name for h in self.hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate host names: {', '.join(dupes)}")
        return self


class HealthCheck(Strict):
    """How to tell that a service instance is healthy: an HTTP URL or a command."""

    url: str | None = None
    command: str | None = None
    retries: int = Field(default=10, ge=1, le=1000)
    interval: float = Field(default=0.5, ge=0, le=600)
    timeout: float = Field(default=5.0, gt=0, le=600)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        return _check_command(value)

    @model_validator(mode="after")
    def _one(self) -> HealthCheck:
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of url or command")
        return self


class MetricsEndpoint(Strict):
    """Where a service's metrics are: a /metrics URL (scraped directly) and/or a Prometheus job."""

    url: str | None = None
    prometheus_job: str | None = None
    error_rate_max: float = Field(default=0.01, ge=0, le=1)
    latency_p95_max: float | None = Field(default=None, gt=0)


class ServiceConfig(Strict):
    """A service kmp-ops deploys: where it lives on a host and how to restart and check it."""

    deploy_path: str
    keep_releases: int = Field(default=5, ge=2, le=100)
    restart: str
    health_check: HealthCheck
    metrics: MetricsEndpoint | None = None
    config_paths: list[str] = Field(default_factory=list)
    integration_tests: list[HealthCheck] = Field(default_factory=list)
    smoke_checks: list[HealthCheck] = Field(default_factory=list)
    drain: str | None = Field(
        default=None, description="command that takes an instance out of rotation (containment)"
    )
    undrain: str | None = Field(
        default=None, description="command that puts it back (incident recovery)"
    )
    block_address: str | None = Field(
        default=None, description="command that blocks ``{address}`` on a host (containment)"
    )
    become_commands: list[Literal["restart", "drain", "undrain", "block_address"]] = Field(
        default_factory=lambda: ["restart"],
        description="which of these commands run through sudo -n as the host's become_user on "
        "hosts with become: true (each must then be one simple command starting with an "
        "absolute path, so that a sudo rule can name it exactly)",
    )
    logs: dict[Name, str] = Field(
        default_factory=dict,
        description="named log file templates (troubleshoot reads only these; default: "
        "``service: {deploy_path}/shared/log/<service>.log``)",
    )

    @field_validator("restart", "drain", "undrain", "block_address")
    @classmethod
    def _commands(cls, value: str | None) -> str | None:
        return _check_command(value)

    @field_validator("logs")
    @classmethod
    def _logs(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            _check_path_template(template, what=f"log {name!r}")
        return value

    analysis: list[Measurement] = Field(default_factory=list)
    staging_tests: StagingTests | None = None
    evidence: EvidencePolicy = Field(default_factory=lambda: EvidencePolicy())

    @field_validator("analysis")
    @classmethod
    def _unique_measurements(cls, value: list[Measurement]) -> list[Measurement]:
        names = [m.name for m in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate measurement names: {', '.join(dupes)}")
        return value

    @field_validator("deploy_path")
    @classmethod
    def _deploy_path(cls, value: str) -> str:
        if ".." in value.split("/") or "\n" in value or "\x00" in value:
            raise ValueError(f"{value!r} is not an acceptable path")
        return value

    def render(self, template: str, host: Host, **extra: str | int) -> str:
        """Fill ``{placeholders}`` from the host (name, address, vars), ``deploy_path`` and extra.

        Raises UnsafeValueError naming an unknown placeholder. Values are inserted as they are:
        for a shell command use :func:`kmpops.shellsafe.render_command`, which quotes them.
        """
        values: dict[str, str | int] = {**host.template_values(), **extra}
        if "deploy_path" not in values and "{deploy_path}" in template:
            values["deploy_path"] = self.render(self.deploy_path, host)

        def fill(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in values:
                raise UnsafeValueError(f"unknown placeholder {{{key}}} in {template!r}")
            return str(values[key])

        return _PLACEHOLDER_RE.sub(fill, template)

    def deploy_path_for(self, host: Host) -> str:
        """The service's deploy path on ``host``."""
        return self.render(self.deploy_path, host)


class StorageConfig(Strict):
    """Where backups and release artifacts are kept: an S3 bucket or a local directory."""

    backend: Literal["s3", "local"] = "local"
    bucket: Name | None = None
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _backend(self) -> StorageConfig:
        if self.backend == "s3" and not self.bucket:
            raise ValueError("backend s3 needs a bucket")
        if self.backend == "local" and self.path is None:
            raise ValueError("backend local needs a path")
        return self


class DatabaseConfig(Strict):
    """A database kmp-ops backs up and restores."""

    kind: Literal["postgresql", "sqlite"] = "postgresql"
    environment: Name = "production"
    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    user: Name = "postgres"
    dbname: Name | None = None
    password: Secret | None = None
    path: Path | None = None
    sanity_queries: list[str] = Field(default_factory=list)
    rpo: Duration = timedelta(hours=25)
    rto: Duration = timedelta(minutes=30)
    restore_scratch_pattern: str = Field(
        default="{dbname}_restore*",
        description="names a restore may create besides the database itself (a glob; "
        "``{dbname}`` is this database's dbname); never another configured database",
    )
    keep_previous_copies: Duration = Field(
        default=timedelta(days=7),
        description="how long the copy a restore replaced (``<dbname>__pre_<time>``) is kept "
        "before backup-retention drops it",
    )

    @field_validator("restore_scratch_pattern")
    @classmethod
    def _scratch_pattern(cls, value: str) -> str:
        if not re.fullmatch(r"(\{dbname\}|[A-Za-z0-9._*?-])+", value) or "*" not in value:
            raise ValueError(
                f"{value!r} is not a scratch name pattern: letters, digits, '.', '_', '-', "
                "'{dbname}' and at least one '*'"
            )
        return value

    @model_validator(mode="after")
    def _kind(self) -> DatabaseConfig:
        if self.kind == "postgresql" and not self.dbname:
            raise ValueError("a postgresql database needs dbname")
        if self.kind == "sqlite" and self.path is None:
            raise ValueError("a sqlite database needs path")
        return self


class AlertRuleConfig(Strict):
    """One alert rule, in the guide's schema (``threshold``, ``duration``, ``severity``) + query.

    ``query`` is PromQL, asked of ``prometheus``; without one only ``high_cpu`` has a default
    (the standard client metric ``process_cpu_seconds_total``): kmp-ops assumes no service's
    metric names. ``scrape`` is the measurement used where no Prometheus is configured (two
    scrapes of every service's metrics URL: ``counter`` increase, divided by ``per``'s); without
    it, only a ``query`` that is a bare metric name can be scraped (its sum per instance).
    """

    threshold: float
    duration: Duration
    severity: Literal["critical", "warning", "info"]
    query: str | None = None
    scrape: ScrapeQuery | None = None
    comparison: Literal[">", ">=", "<", "<="] = ">"
    incident: bool | None = None
    description: str = ""

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("threshold must be a number or a percentage")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return parse_threshold(value)
        raise ValueError(f"expected a number or a percentage such as '80%', got {value!r}")


DatabaseBackupCompression = Literal["zstd", "pg_dump"]


class BackupSchedule(Strict):
    """One entry of the guide's ``backups:`` block.

    ``compression`` (``backups.database`` only): how a database dump is compressed. ``zstd``
    (the default): ``pg_dump -Fc --compress=0`` compressed by zstd level 3 in kmp-ops on the way
    to the store (several times faster than pg_dump's gzip, see bench/README.md); ``pg_dump``:
    pg_dump's own gzip (the format of earlier kmp-ops versions). Each backup's manifest records
    its format, so backups of either kind verify and restore whatever the setting is now.
    """

    schedule: str
    retention: Duration
    type: Literal["full", "incremental"]
    compression: DatabaseBackupCompression | None = None

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9*/,\-A-Za-z]+", f) for f in fields):
            raise ValueError(f"{value!r} is not a five-field cron expression")
        return value


class NotificationConfig(Strict):
    """Notification routes: severity → apprise URLs (``jsonl:///path`` is the file sink)."""

    routes: dict[Literal["critical", "warning", "info"], list[str]] = Field(default_factory=dict)
    repeat_interval: Duration = timedelta(hours=4)
    escalation: dict[Literal["L1", "L2", "L3"], list[str]] = Field(default_factory=dict)
    ack_timeout: Duration = timedelta(minutes=15)
    # the on-call people's token book (``name:sha256`` lines, like approver_tokens): an
    # acknowledgement counts only with the responder's own token
    responder_tokens: Secret | None = None

    @model_validator(mode="after")
    def _escalation_needs_a_token_book(self) -> NotificationConfig:
        if self.escalation and self.responder_tokens is None:
            raise ValueError(
                "escalation needs responder_tokens (a token book): without one an "
                "acknowledgement cannot be authenticated and no page would ever be taken"
            )
        return self


class AuditCheckpoints(Strict):
    """Where the audit chain's head is anchored: write-once storage outside the records database.

    ``s3``: objects in ``bucket`` (created with Object Lock enabled) under ``prefix``, each put in
    COMPLIANCE mode until its time + ``retention``; endpoint and credentials are ``storage``'s.
    ``local``: one append-only JSON Lines file at ``path`` (the embedded default: next to a
    SQLite records database, ``<db>.checkpoints.jsonl``).
    """

    backend: Literal["s3", "local"] = "local"
    bucket: Name | None = None
    prefix: str = Field(default="audit-checkpoints/", pattern=r"^[A-Za-z0-9._/-]*$")
    retention: Duration = timedelta(days=400)
    path: Path | None = None

    @model_validator(mode="after")
    def _backend(self) -> AuditCheckpoints:
        if self.backend == "s3" and not self.bucket:
            raise ValueError("backend s3 needs a bucket (created with Object Lock enabled)")
        if self.backend == "local" and self.path is None:
            raise ValueError("backend local needs a path")
        if self.retention <= timedelta(0):
            raise ValueError("retention must be positive")
        return self


class RecordsConfig(Strict):
    """Where the records (audit chain, releases, approvals, backups, incidents) live.

    ``audit_key`` is the secret (a reference: ``file:``/``env:``/``prefect:``) that authenticates
    every audit event (HMAC-SHA256) and signs the checkpoints; it never lives in the records
    database. Without it kmp-ops fails closed: no audit event is written and ``kmpops audit
    verify`` fails.
    """

    url: str = "sqlite:///var/records.db"
    audit_key: Secret | None = None
    checkpoints: AuditCheckpoints | None = None

    def checkpoint_target(self) -> AuditCheckpoints | None:
        """The configured checkpoint store, else the embedded default for a SQLite database."""
        if self.checkpoints is not None:
            return self.checkpoints
        if self.url.startswith("sqlite:///"):
            db = self.url.removeprefix("sqlite:///")
            if db not in ("", ":memory:"):
                return AuditCheckpoints(backend="local", path=Path(db + ".checkpoints.jsonl"))
        return None


class PrometheusConfig(Strict):
    """The Prometheus server kmp-ops queries."""

    url: str


class KnownKey(Strict):
    """A person's or a service's SSH key that kmp-ops knows (incident containment may disable
    it, always with an approval)."""

    owner: Name
    fingerprint: str = Field(pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")


class IncidentPolicy(Strict):
    """What incident containment may touch when an alert's labels name the target.

    ``widest_block_v4`` / ``widest_block_v6``: the widest network an address block may cover
    (prefix length at least this). ``protected_addresses``: kmp-ops' own addresses or networks
    (control node, Prefect server, records database, Prometheus...), never blocked — the
    hosts' IP addresses are protected without being listed. ``known_keys``: the keys a
    compromised-credentials containment may disable (kmp-ops' own keys never are).
    """

    widest_block_v4: int = Field(default=24, ge=0, le=32)
    widest_block_v6: int = Field(default=64, ge=0, le=128)
    protected_addresses: list[str] = Field(default_factory=list)
    known_keys: list[KnownKey] = Field(default_factory=list)

    @field_validator("protected_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for text in value:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an IP address or network") from None
        return value


class AccessPolicy(Strict):
    """Where authorized_keys live and which key options provision-access may write.

    ``authorized_keys`` is a path template (``{root}/etc/authorized_keys``; placeholders from host
    vars) used for hosts without an ``authorized_keys`` var. ``key_options`` lists the exact
    option words a public key may carry (``no-port-forwarding``, ``from="10.0.0.0/8"``); any other
    option is refused. No flow parameter can name another location or another option.
    """

    authorized_keys: str | None = None
    key_options: list[str] = Field(default_factory=list)

    @field_validator("authorized_keys")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None:
            _check_path_template(value, what="authorized_keys")
        return value

    @field_validator("key_options")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        for option in value:
            if not KEY_OPTION_RE.fullmatch(option):
                raise ValueError(
                    f'{option!r} is not a key option (a word, or word="value" without quotes, '
                    "backslashes or newlines in the value)"
                )
        return value


KEY_OPTION_RE = re.compile(r'[A-Za-z][A-Za-z0-9-]{0,63}(="[^"\\\n\r\x00]{0,512}")?')


def _check_command(value: str | None) -> str | None:
    """A shell command template: placeholders must stand unquoted (``shellsafe``)."""
    if value is None:
        return value
    from kmpops.shellsafe import check_command_template

    try:
        check_command_template(value)
    except UnsafeValueError as exc:
        raise ValueError(str(exc)) from None
    return value


def _check_path_template(template: str, *, what: str) -> None:
    """A path template: absolute (or starting with a placeholder), safe once filled."""
    from kmpops.shellsafe import validate_path

    sample = _PLACEHOLDER_RE.sub("x", template)
    try:
        validate_path(sample, what=what)
    except UnsafeValueError as exc:
        raise ValueError(str(exc)) from None
    if not (template.startswith("/") or template.startswith("{")):
        raise ValueError(f"{what}: {template!r} must be an absolute path (or start with {{root}})")


def _check_path_vars(values: dict[str, str | int]) -> None:
    """Host vars that name places on the host: ``root`` a safe absolute path (it reaches
    ``find``, ``du`` and ``df`` as an argument), ``authorized_keys`` a safe path."""
    from kmpops.shellsafe import validate_absolute_path, validate_path

    try:
        if "root" in values:
            validate_absolute_path(str(values["root"]), what="root")
        if "authorized_keys" in values:
            validate_path(str(values["authorized_keys"]), what="authorized_keys")
    except UnsafeValueError as exc:
        raise ValueError(str(exc)) from None


class LockPolicy(Strict):
    """What a run does when a target it needs is held by another run."""

    on_busy: Literal["wait", "refuse"] = "wait"
    wait_timeout: Duration = timedelta(minutes=30)


class LocksConfig(Strict):
    """Target locks (``kmpops.locks``): lease TTL and renewal, and the busy policy (default
    and per procedure, by flow name)."""

    ttl: Duration = timedelta(seconds=60)
    renew_interval: Duration = timedelta(seconds=10)
    poll_interval: Duration = timedelta(seconds=1)
    on_busy: Literal["wait", "refuse"] = "wait"
    wait_timeout: Duration = timedelta(minutes=30)
    procedures: dict[Name, LockPolicy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounded(self) -> LocksConfig:
        if self.ttl < timedelta(seconds=1):
            raise ValueError("ttl must be at least 1s")
        if self.renew_interval <= timedelta(0) or self.renew_interval * 3 > self.ttl:
            raise ValueError(
                f"renew_interval must be positive and at most a third of ttl "
                f"({self.ttl.total_seconds():g}s), so two missed renewals do not lose a lease"
            )
        if not timedelta(seconds=0.05) <= self.poll_interval <= timedelta(minutes=1):
            raise ValueError("poll_interval must be between 0.05s and 1m")
        return self

    def policy(self, procedure: str) -> LockPolicy:
        """The busy policy of ``procedure`` (its override, else the defaults)."""
        return self.procedures.get(
            procedure, LockPolicy(on_busy=self.on_busy, wait_timeout=self.wait_timeout)
        )


class OpsConfig(Strict):
    """The whole ``ops.yaml``."""

    project: Name = "kmp"
    records: RecordsConfig = RecordsConfig()
    storage: StorageConfig | None = None
    prometheus: PrometheusConfig | None = None
    notifications: NotificationConfig = NotificationConfig()
    environments: dict[Name, Environment] = Field(default_factory=dict)
    services: dict[Name, ServiceConfig] = Field(default_factory=dict)
    databases: dict[Name, DatabaseConfig] = Field(default_factory=dict)
    alerts: dict[Name, AlertRuleConfig] = Field(default_factory=dict)
    backups: dict[Name, BackupSchedule] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts())
    incidents: IncidentPolicy = IncidentPolicy()
    access: AccessPolicy = AccessPolicy()
    locks: LocksConfig = LocksConfig()

    @property
    def database_backup_compression(self) -> DatabaseBackupCompression:
        """``backups.database.compression``, ``zstd`` when unset (or without the block)."""
        entry = self.backups.get("database")
        return entry.compression if entry is not None and entry.compression else "zstd"

    @model_validator(mode="after")
    def _compression_only_for_database_backups(self) -> OpsConfig:
        for name, entry in self.backups.items():
            if name != "database" and entry.compression is not None:
                raise ValueError(
                    f"backups.{name}.compression: only backups.database takes a compression "
                    "(configuration backups store each file as it is)"
                )
        return self

    @model_validator(mode="after")
    def _checkpoints_on_s3_storage(self) -> OpsConfig:
        cp = self.records.checkpoints
        if cp is not None and cp.backend == "s3":
            if self.storage is None or self.storage.backend != "s3":
                raise ValueError(
                    "records.checkpoints: backend s3 uses storage's endpoint and credentials; "
                    "storage.backend must be s3"
                )
            if cp.bucket == self.storage.bucket:
                raise ValueError(
                    "records.checkpoints.bucket must not be storage.bucket "
                    "(checkpoints need a bucket of their own, created with Object Lock)"
                )
        return self

    @model_validator(mode="after")
    def _alert_rules_evaluable(self) -> OpsConfig:
        # A config that lists hosts is one that evaluate-alerts runs on: every rule needs a
        # query it can ask (the guide's blocks alone, with no hosts, still load verbatim).
        if not any(env.hosts for env in self.environments.values()):
            return self
        from kmpops.plans.incident import default_query

        for name, rule in self.alerts.items():
            if rule.query is None and rule.scrape is None and default_query(name) is None:
                raise ValueError(
                    f"alerts.{name}.query: no query and no default for this rule name (kmp-ops "
                    "assumes no service's metric names): give a PromQL query, e.g. "
                    'sum by (instance) (rate(http_requests_total{code=~"5.."}[1m])) / '
                    "sum by (instance) (rate(http_requests_total[1m])), and/or scrape: "
                    "{counter: {metric: ...}, per: {metric: ...}} for use without Prometheus"
                )
        return self

    @model_validator(mode="after")
    def _become_commands_are_simple(self) -> OpsConfig:
        """Where any host has become, every become command must be one sudo can match."""
        if not any(h.become for env in self.environments.values() for h in env.hosts):
            return self
        from kmpops.shellsafe import render_argv

        for name, svc in self.services.items():
            for kind in svc.become_commands:
                template = getattr(svc, kind)
                if template is None:
                    continue
                sample = {k: "x" for k in _PLACEHOLDER_RE.findall(template)}
                try:
                    argv = render_argv(template, sample)
                except UnsafeValueError as exc:
                    raise ValueError(f"services.{name}.{kind} (a become command): {exc}") from None
                if not (argv[0].startswith("/") or template.startswith("{")):
                    raise ValueError(
                        f"services.{name}.{kind} (a become command): {template!r} must start "
                        "with an absolute path (a sudo rule names the program by its full path)"
                    )
        return self

    @model_validator(mode="after")
    def _hosts_unique_across_environments(self) -> OpsConfig:
        seen: dict[str, str] = {}
        for env_name, env in self.environments.items():
            for host in env.hosts:
                if host.name in seen:
                    raise ValueError(
                        f"host {host.name!r} is in both {seen[host.name]} and {env_name}"
                    )
                seen[host.name] = env_name
        return self

    def environment(self, name: str) -> Environment:
        """The environment called ``name``; KeyError names the known ones."""
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            raise KeyError(f"unknown environment {name!r} (known: {known})") from None

    def service(self, name: str) -> ServiceConfig:
        """The service called ``name``; KeyError names the known ones."""
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services)) or "none"
            raise KeyError(f"unknown service {name!r} (known: {known})") from None

    def host(self, name: str) -> tuple[str, Host]:
        """(environment name, host) for a host name; KeyError if no environment has it."""
        for env_name, env in self.environments.items():
            for host in env.hosts:
                if host.name == name:
                    return env_name, host
        raise KeyError(f"unknown host {name!r}")

    def secret_values(self) -> list[SecretRef]:
        """Every secret reference in the config (for the log redactor)."""
        refs: list[SecretRef] = []
        if self.storage:
            refs += [r for r in (self.storage.access_key_id, self.storage.secret_access_key) if r]
        refs += [db.password for db in self.databases.values() if db.password]
        refs += [self.records.audit_key] if self.records.audit_key else []
        refs += [
            env.policy.approver_tokens
            for env in self.environments.values()
            if env.policy.approver_tokens
        ]
        for env in self.environments.values():
            for host in env.hosts:
                refs += [host.key_passphrase] if host.key_passphrase else []
                refs += [hop.key_passphrase for hop in host.jump if hop.key_passphrase]
        return refs


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "constrained-")) or part in (
            "str",
            "int",
            "float",
            "list[str]",
        ):
            continue
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        problems.append(f"{_loc_to_path(item['loc'])}: {msg}")
    return problems


def parse_config(data: Any, *, source: str | None = None) -> OpsConfig:
    """Validate already-parsed YAML data; raise ConfigError listing every problem by field path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of sections"], source)
    data = _expand_inventories(data, Path(source).parent if source else Path.cwd(), source)
    try:
        return OpsConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), source) from None


_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(path: str | Path) -> OpsConfig:
    """Read and validate an ``ops.yaml``; raise ConfigError (never a traceback) on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"(file): cannot read {path}: {err.strerror}"], str(path)) from None
    try:
        # libyaml when present: a 500-host ops.yaml (200 kB) parses in 0.07 s instead of 0.83 s
        data = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"(yaml): malformed YAML{where}: {problem}"], str(path)) from None
    return parse_config(data, source=str(path))


def summary(config: OpsConfig) -> str:
    """A one-line summary of a valid config."""
    hosts = sum(len(e.hosts) for e in config.environments.values())
    return (
        f"{len(config.environments)} environments, {hosts} hosts, "
        f"{len(config.services)} services, {len(config.databases)} databases, "
        f"{len(config.alerts)} alert rules, {len(config.backups)} backup schedules"
    )


# -- verification: analysis, staging tests, checklist evidence policy (issue #11) ---------------

_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_CONDITION_RE = re.compile(r"^\s*(<=|>=|<|>|==)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
ANALYSIS_PLACEHOLDERS = ("instances", "window", "service", "environment")


class CounterSelector(Strict):
    """A counter on a service's ``/metrics`` page: its name and label matchers (equality)."""

    metric: str
    match: dict[str, str] = Field(default_factory=dict)

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if not _METRIC_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a Prometheus metric name")
        return value

    @field_validator("match")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _LABEL_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a Prometheus label name")
        return value


class ScrapeQuery(Strict):
    """A measurement from two scrapes of every host's metrics URL (no Prometheus needed): the
    increase of ``counter`` between them, divided by the increase of ``per`` when given (a
    ratio). ``requests`` (default: ``per``) is the traffic the measurement saw."""

    counter: CounterSelector
    per: CounterSelector | None = None
    requests: CounterSelector | None = None


class LogQuery(Strict):
    """New lines matching ``pattern`` (an extended regular expression, as ``grep -E``) in the
    log file at ``path`` (a template: ``{deploy_path}``, host vars) since the switch."""

    path: str
    pattern: str = Field(min_length=1, max_length=500)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"pattern {value!r} is not a regular expression: {err}") from None
        if "\n" in value or "\x00" in value:
            raise ValueError("pattern must be one line")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if ".." in value.split("/") or "\n" in value or "\x00" in value:
            raise ValueError(f"{value!r} is not an acceptable path")
        return value


class Measurement(Strict):
    """One named measurement of a service's analysis (like an Argo Rollouts AnalysisTemplate
    metric): a PromQL ``query`` (placeholders ``{instances}``, ``{window}``, ``{service}``,
    ``{environment}``) asked of the configured Prometheus, else a ``scrape`` of the hosts'
    metrics; or a ``log`` count. Taken ``count`` times, ``interval`` apart; more than
    ``failure_limit`` failed measurements fail the analysis; a measurement with no data or
    fewer than ``min_requests`` requests is *inconclusive*."""

    name: Name
    query: str | None = None
    requests_query: str | None = None
    scrape: ScrapeQuery | None = None
    log: LogQuery | None = None
    success: str = Field(description="condition on the value: '< 0.05', '<= 0', '>= 0.99'")
    interval: Duration = timedelta(seconds=2)
    count: int = Field(default=3, ge=1, le=100)
    failure_limit: int = Field(default=0, ge=0)
    min_requests: float = Field(default=0, ge=0)

    @field_validator("success")
    @classmethod
    def _success(cls, value: str) -> str:
        if not _CONDITION_RE.match(value):
            raise ValueError(f"{value!r} is not a condition such as '< 0.05' or '>= 0.99'")
        return value.strip()

    @field_validator("query", "requests_query")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return value
        unknown = sorted(set(_PLACEHOLDER_RE.findall(value)) - set(ANALYSIS_PLACEHOLDERS))
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{unknown[0]}}} (known: {', '.join(ANALYSIS_PLACEHOLDERS)})"
            )
        return value

    @model_validator(mode="after")
    def _source(self) -> Measurement:
        metric = self.query is not None or self.scrape is not None
        if metric == (self.log is not None):
            raise ValueError("give a query and/or scrape, or a log (not both)")
        if self.requests_query is not None and self.query is None:
            raise ValueError("requests_query needs a query")
        if self.min_requests and (
            (self.query is not None and self.requests_query is None)
            or (self.scrape is not None and (self.scrape.requests or self.scrape.per) is None)
        ):
            raise ValueError("min_requests needs requests_query (and scrape.per or requests)")
        return self


class TrafficProfile(Strict):
    """Test traffic against each staging host: ``requests`` GETs of ``url`` (a template such as
    ``http://{address}:{web_port}/work``; loopback only) over ``concurrency`` connections; any
    answer outside ``expect_status`` fails the integration tests."""

    url: str
    requests: int = Field(default=100, ge=1, le=100_000)
    concurrency: int = Field(default=4, ge=1, le=64)
    timeout: float = Field(default=5.0, gt=0, le=60)
    expect_status: list[int] = Field(default_factory=lambda: [200], min_length=1)


class StagingTests(Strict):
    """What the integration-tests stage runs against staging: a ``command`` (on each staging
    ``host``, or once ``local``ly on the control node; placeholders from the host) and/or a
    traffic profile."""

    command: str | None = None
    run_on: Literal["host", "local"] = "host"
    timeout: float = Field(default=300, gt=0, le=3600)
    traffic: TrafficProfile | None = None

    @model_validator(mode="after")
    def _something(self) -> StagingTests:
        if self.command is None and self.traffic is None:
            raise ValueError("give a command and/or traffic")
        return self


class EvidencePolicy(Strict):
    """What the checklist's evidence records must show (per service)."""

    min_tests: int = Field(default=1, ge=0)
    max_findings: dict[Literal["critical", "high", "medium", "low"], int] = Field(
        default_factory=lambda: {"critical": 0, "high": 0}
    )
    max_outdated: int = Field(default=0, ge=0)


ServiceConfig.model_rebuild()  # refers to the verification models above


class Timeouts(Strict):
    """How long kmp-ops waits for the outside world before it fails the step (``timeouts:``).

    Every wait has a bound: a step that runs past one fails with a message naming the host or
    database and what it was doing, and its compensation runs.
    """

    connect: Duration = Field(
        default=timedelta(seconds=10),
        description="TCP connect + SSH handshake + authentication; a database connection",
    )
    sftp: Duration = Field(
        default=timedelta(seconds=60),
        description="one SFTP request (put/get/stat) without progress from the host",
    )
    database_lock: Duration = Field(
        default=timedelta(seconds=60),
        description="waiting for a table lock (pg_dump --lock-wait-timeout, lock_timeout)",
    )
    database_statement: Duration = Field(
        default=timedelta(minutes=10),
        description="one SQL statement of kmp-ops (row counts, sanity queries, renames)",
    )
    database_tool: Duration = Field(
        default=timedelta(hours=6),
        description="the whole run of one pg_dump / pg_restore",
    )
    task: Duration = Field(
        default=timedelta(hours=8),
        description="one Prefect task run (the connector bounds above fire first)",
    )

    @model_validator(mode="after")
    def _positive(self) -> Timeouts:
        for name in type(self).model_fields:
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be longer than 0s")
        return self

    def ssh_options(self) -> dict[str, float]:
        """Keyword options of ``SSHConnection.from_host`` for these bounds."""
        return {
            "connect_timeout": self.connect.total_seconds(),
            "sftp_timeout": self.sftp.total_seconds(),
        }

    def database_options(self) -> dict[str, float]:
        """Keyword options of ``PostgresDatabase`` for these bounds."""
        return {
            "connect_timeout": self.connect.total_seconds(),
            "lock_timeout": self.database_lock.total_seconds(),
            "statement_timeout": self.database_statement.total_seconds(),
            "tool_timeout": self.database_tool.total_seconds(),
        }


OpsConfig.model_rebuild()  # ``timeouts`` refers to Timeouts, defined after OpsConfig


def _expand_inventories(data: dict[str, Any], base: Path, source: str | None) -> dict[str, Any]:
    """``data`` with each ``environments.<env>.inventory`` read and its hosts appended to the
    environment's ``hosts`` (raw entries, validated with the rest). A relative inventory path is
    relative to the ops.yaml's directory. Raises ConfigError naming the environment and the
    inventory's line; returns ``data`` itself when no environment has an inventory."""
    envs = data.get("environments")
    if not isinstance(envs, dict) or not any(
        isinstance(e, dict) and e.get("inventory") is not None for e in envs.values()
    ):
        return data
    from kmpops.inventory import InventoryError, load_inventory, map_environments

    expanded = dict(envs)
    for env_name, env in envs.items():
        if not isinstance(env, dict) or env.get("inventory") is None:
            continue
        where = f"environments.{env_name}.inventory"
        try:
            ref = InventorySource.model_validate(env["inventory"])
        except ValidationError as err:
            raise ConfigError(
                [
                    f"{where}.{p}" if not p.startswith("(") else f"{where}: {p}"
                    for p in _format_errors(err)
                ],
                source,
            ) from None
        path = ref.path if ref.path.is_absolute() else base / ref.path
        defaults = {
            k: v for k, v in (env["inventory"].get("defaults") or {}).items() if v is not None
        }
        try:
            inventory = load_inventory(path, ref.format)
            mapped = map_environments(
                inventory,
                {ref.group or str(env_name): str(env_name)},
                defaults=defaults,
                base=path.parent,
            )
        except InventoryError as err:
            raise ConfigError([f"{where}: {err}"], source) from None
        hosts = list(env.get("hosts") or []) + mapped[0].hosts
        expanded[env_name] = {**env, "hosts": hosts}
    return {**data, "environments": expanded}
