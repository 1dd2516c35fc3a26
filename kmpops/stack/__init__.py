"""The local stack: everything kmp-ops needs on one machine, as processes on 127.0.0.1.

``up(spec)`` starts (idempotently) an sshd fleet split into staging and production hosts, a
SeaweedFS S3 server, a private PostgreSQL cluster, a Prefect server (SQLite or PostgreSQL-backed),
and Prometheus scraping the sample service's port on every host; it writes ``<root>/stack.json``
and a complete, valid ``<root>/ops.yaml``. ``down(root)`` stops every process by its pid file.
Ports are ``port_base + offset`` (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kmpops.stack._proc import StackError, busy_ports, read_pid

__all__ = [
    "COMPONENTS",
    "SAMPLE_SERVICE_VERIFICATION",
    "StackError",
    "StackHost",
    "StackInfo",
    "StackSpec",
    "approver_token",
    "ci_evidence",
    "down",
    "host_ports",
    "load",
    "pid_files",
    "status",
    "up",
]

COMPONENTS = ("sshd", "s3", "postgres", "prefect", "prometheus")
BASTION_OFFSET = 250
MAX_HOSTS = 2000
_FIRST_LAYOUT_HOSTS = 99  # hosts 0..98 keep the round-1 ports (base+1+i, web base+501+i)


def host_ports(port_base: int, index: int) -> tuple[int, int]:
    """``(ssh port, web port)`` of the stack's ``index``-th host (0-based, staging first).

    The layout (offsets from ``port_base``): hosts 0-98 at 1-99 (ssh) and 501-599 (web), as
    since the first round; hosts 99-1999 at 1099-2999 and 3099-4999. Offsets 100-499 are the
    services (S3 100-107, PostgreSQL 200, bastion 250, Prometheus 300, Prefect 400) and 800-999
    are left to tests' own daemons. Raises StackError for an index outside 0..MAX_HOSTS-1.
    """
    if not 0 <= index < MAX_HOSTS:
        raise StackError(f"host index {index} is outside the port layout (0-{MAX_HOSTS - 1})")
    if index < _FIRST_LAYOUT_HOSTS:
        return port_base + 1 + index, port_base + 501 + index
    return port_base + 1000 + index, port_base + 3000 + index


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (32768 if unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass(frozen=True)
class StackSpec:
    """What to start and where."""

    root: Path
    port_base: int = 17000
    production_hosts: int = 4
    staging_hosts: int = 2
    prefect_db: Literal["sqlite", "postgres"] = "sqlite"
    components: tuple[str, ...] = COMPONENTS
    bastion: bool = False  # hosts reached through a bastion sshd at port_base + 250
    bastion_port: int | None = None  # instead of port_base + 250
    # the non-root user ops.yaml logs in as (created on this machine; sudo for the restart);
    # None, or a stack not run by root: log in as root as before
    deploy_user: str | None = "kmpdeploy"

    def __post_init__(self) -> None:
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise StackError(f"unknown stack components: {', '.join(sorted(unknown))}")
        if not 1024 <= self.port_base <= 64000:
            raise StackError(f"port base {self.port_base} must be between 1024 and 64000")
        count = self.production_hosts + self.staging_hosts
        if self.production_hosts < 0 or self.staging_hosts < 0:
            raise StackError("host counts cannot be negative")
        if count > MAX_HOSTS:
            raise StackError(
                f"{count} hosts do not fit in the port layout: at most {MAX_HOSTS} "
                "(ssh at port base + 1-99 and 1099-2999, web at + 501-599 and 3099-4999)"
            )
        web = (host_ports(self.port_base, i)[1] for i in range(count))
        highest = max([*_ports(self), *web], default=self.port_base)
        if highest > 65535:
            raise StackError(
                f"port base {self.port_base} with {count} hosts needs ports up to {highest}, "
                "above 65535: use a lower --port-base"
            )
        low = _ephemeral_low()
        if highest >= low and self.port_base < low:
            raise StackError(
                f"port base {self.port_base} with {count} hosts needs ports up to {highest}, in "
                f"the kernel's ephemeral range (from {low}, "
                "/proc/sys/net/ipv4/ip_local_port_range) where outgoing connections take "
                f"ports at random: use a --port-base at most {low - 1 - (highest - self.port_base)}"
            )


@dataclass(frozen=True)
class StackHost:
    """One sshd host of the stack and the environment it belongs to."""

    name: str
    environment: str
    port: int
    root: str
    web_port: int


@dataclass
class StackInfo:
    """What runs: written to ``<root>/stack.json``, read back by :func:`load`."""

    root: str
    port_base: int
    ops_yaml: str
    hosts: list[StackHost] = field(default_factory=list)
    key_file: str = ""
    known_hosts: str = ""
    s3: dict[str, Any] | None = None
    postgres: dict[str, Any] | None = None
    prefect: dict[str, Any] | None = None
    prometheus: dict[str, Any] | None = None
    notifications: str = ""
    records_url: str = ""
    started_s: float = 0.0
    bastion: dict[str, Any] | None = None
    deploy_user: str = ""  # "" : the hosts are reached as root
    sudoers: str = ""  # the stack's file in /etc/sudoers.d
    # each host's private apt/dpkg state and the stack's repositories (kmpops.stack.apt_repo):
    # {"repos": {name: dir}}; None where apt/dpkg are missing or the stack does not run as root
    apt: dict[str, Any] | None = None

    def host(self, name: str) -> StackHost:
        """The stack host called ``name``."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


def _host_names(spec: StackSpec) -> list[tuple[str, str]]:
    names = [(f"stg-{i}", "staging") for i in range(1, spec.staging_hosts + 1)]
    names += [(f"prd-{i}", "production") for i in range(1, spec.production_hosts + 1)]
    return names


def _ports(spec: StackSpec) -> dict[int, str]:
    """Every port ``up(spec)`` listens on, with what listens there."""
    base = spec.port_base
    ports: dict[int, str] = {}
    if "sshd" in spec.components:
        for i, (name, _env) in enumerate(_host_names(spec)):
            ports[host_ports(base, i)[0]] = f"sshd {name}"
    if "sshd" in spec.components and spec.bastion:
        ports[spec.bastion_port or base + BASTION_OFFSET] = "sshd bastion"
    if "s3" in spec.components:
        for offset in range(8):
            ports[base + 100 + offset] = "SeaweedFS"
    if "postgres" in spec.components:
        ports[base + 200] = "PostgreSQL"
    if "prometheus" in spec.components:
        ports[base + 300] = "Prometheus"
    if "prefect" in spec.components:
        ports[base + 400] = "Prefect server"
    return ports


def pid_files(root: Path) -> list[Path]:
    """Every pid file of the stack under ``root``, sorted, as paths under ``root``.

    That includes the host roots :func:`kmpops.stack.deploy_user.place_hosts` moved outside the
    checkout (``root/hosts`` is then a symlink, which a recursive glob does not enter): their
    pid files are named through the symlink, so ``relative_to(root)`` holds for every one.
    """
    if not root.is_dir():
        return []
    found = set(root.rglob("*.pid"))
    hosts = root / "hosts"
    if hosts.is_symlink() and hosts.is_dir():
        target = hosts.resolve()
        found.update(hosts / p.relative_to(target) for p in target.rglob("*.pid"))
    return sorted(found)


def _live_pid_files(root: Path) -> dict[Path, int]:
    """The pid files under ``root`` (:func:`pid_files`) that name a live process."""
    live: dict[Path, int] = {}
    for pid_file in pid_files(root):
        pid = read_pid(pid_file)
        if pid is not None:
            live[pid_file] = pid
    return live


def up(spec: StackSpec) -> StackInfo:
    """Start every component of ``spec`` (those already running are left as they are).

    Before starting anything, every port the stack needs is checked: a port held by a process
    that is not part of this stack raises StackError naming the port, the holder (pid, command
    line, working directory) and what to do, and nothing is started. If a component then fails,
    everything this call started is stopped again (components that were already running stay
    up) and StackError names the component that failed.
    """
    root = spec.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = _live_pid_files(root)
    _refuse_busy_ports(spec, root)
    try:
        return _start(spec, root)
    except BaseException:
        _stop_started(root, before)
        raise


def _refuse_busy_ports(spec: StackSpec, root: Path, only: str | None = None) -> None:
    """Raise StackError if a port of the stack (or of component ``only``) is held by a stranger.

    "Stranger": any process that is not one of this stack's (by the pid files under ``root``,
    children included). The message names each port, its holder and what to do.
    """
    labels = {
        port: label
        for port, label in _ports(spec).items()
        if only is None or label.lower().startswith(only)
    }
    own = set(_live_pid_files(root).values())
    busy = busy_ports(sorted(labels), own_pids=own)
    if busy:
        lines = [f"port {port} ({labels[port]}) is held by {who}" for port, who in busy.items()]
        raise StackError(
            "the stack's ports on 127.0.0.1 are taken: "
            + "; ".join(lines)
            + ". If that is a kmp-ops stack of another checkout, run `make stack-down` there "
            "(the holder's cwd says where); or start this one on other ports with "
            f"`kmpops stack up --port-base N` (now {spec.port_base}; it uses N+1 … N+600)."
        )


def _stop_started(root: Path, before: dict[Path, int]) -> None:
    """Stop every process under ``root`` that was not running before this ``up`` began."""
    from kmpops.stack import postgres
    from kmpops.stack._proc import stop_process

    started = {p: pid for p, pid in _live_pid_files(root).items() if before.get(p) != pid}
    for pid_file in started:
        try:
            if pid_file == root / "postgres" / "postgres.pid":
                postgres.stop(root)
            else:
                stop_process(pid_file, timeout=5.0)
        except Exception as err:  # keep stopping the others; the error is reported after
            print(f"could not stop {pid_file}: {err}")


def _start(spec: StackSpec, root: Path) -> StackInfo:
    t0 = time.monotonic()
    base = spec.port_base
    names = _host_names(spec)
    deploy_user = spec.deploy_user if os.getuid() == 0 else None
    hosts_dir = root / "hosts"
    if deploy_user and "sshd" in spec.components:
        # before any daemon starts: host roots where the deploy user can reach them
        from kmpops.stack.deploy_user import ensure_user, place_hosts

        hosts_dir = place_hosts(root, ensure_user(deploy_user))
    hosts = [
        StackHost(
            name=name,
            environment=env,
            port=host_ports(base, i)[0],
            root=str(hosts_dir / name),
            web_port=host_ports(base, i)[1],
        )
        for i, (name, env) in enumerate(names)
    ]
    info = StackInfo(
        root=str(root),
        port_base=base,
        ops_yaml=str(root / "ops.yaml"),
        hosts=hosts,
        notifications=str(root / "notifications.jsonl"),
        records_url=f"sqlite:///{root / 'records.db'}",
    )

    def start_sshd() -> None:
        from kmpops.stack import sshd

        started = sshd.start_fleet(root, [h.name for h in hosts], [h.port for h in hosts])
        info.key_file = str(started[0].key_file)
        info.known_hosts = str(started[0].known_hosts)
        for host in hosts:
            _seed_host_config(Path(host.root), host)
        info.apt = _prepare_packages(root, hosts)
        if deploy_user:
            _prepare_deploy_user(deploy_user, hosts)
            info.deploy_user = deploy_user
        if spec.bastion:
            bastion = sshd.start_bastion(root, spec.bastion_port or base + BASTION_OFFSET)
            info.bastion = {
                "address": bastion.address,
                "port": bastion.port,
                "log": str(bastion.log_file),
            }

    def start_s3() -> None:
        from kmpops.stack import seaweed

        info.s3 = _plain(seaweed.start(root, base + 100))

    def start_postgres() -> None:
        from kmpops.stack import postgres

        info.postgres = _plain(postgres.start(root, base + 200))

    jobs = {"sshd": start_sshd, "s3": start_s3, "postgres": start_postgres}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items() if name in spec.components}
        errors = []
        for name, fut in futures.items():
            try:
                fut.result()
            except Exception as err:
                errors.append(f"{name}: {err}")
        if errors:
            _write(info)
            raise StackError("; ".join(errors))

    if info.postgres:
        _ensure_databases(base + 200)

    if "prometheus" in spec.components:
        from kmpops.stack import prometheus

        _refuse_busy_ports(spec, root, only="prometheus")  # taken since the first check?

        targets = {"web": [f"127.0.0.1:{h.web_port}" for h in hosts]}
        info.prometheus = _plain(prometheus.start(root, base + 300, scrape_targets=targets))
    if "prefect" in spec.components:
        from kmpops.stack import prefect_server

        _refuse_busy_ports(spec, root, only="prefect")

        db_url = None
        if spec.prefect_db == "postgres":
            if info.postgres is None:
                raise StackError("prefect_db=postgres needs the postgres component")
            db_url = f"postgresql+asyncpg://postgres@127.0.0.1:{base + 200}/prefect"
        info.prefect = _plain(prefect_server.start(root, base + 400, database_url=db_url))

    _write_approver_tokens(root)
    _write_audit_key(root)
    _write_ops_yaml(info)
    if info.deploy_user:
        info.sudoers = str(_install_sudo_rules(info))
    info.started_s = round(time.monotonic() - t0, 2)
    _write(info)
    return info


APPROVERS = ("alice", "bob", "carol")
#: people of the local stack: the approvers, and dave and erin who request changes (a requester
#: confirms their request with their own token before anyone can approve it)
PEOPLE = (*APPROVERS, "dave", "erin")


def _write_approver_tokens(root: Path) -> None:
    """Give each local person a random token; the config references only their digests.

    ``secrets/approver-<name>.token`` holds the plain token (what that person would keep to
    themselves), ``secrets/approver_tokens`` the ``name:sha256`` book the policy checks against.
    A book written before a person was added gets that person appended (existing tokens kept).
    """
    import hashlib
    import secrets as pysecrets

    from kmpops.secrets import write_secret_file

    folder = root / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    book = folder / "approver_tokens"
    lines = book.read_text().splitlines() if book.exists() else []
    known = {line.partition(":")[0] for line in lines}
    if known >= set(PEOPLE):
        return
    for name in PEOPLE:
        if name in known:
            continue
        token = pysecrets.token_urlsafe(24)
        token_file = folder / f"approver-{name}.token"
        write_secret_file(token_file, token + "\n")
        lines.append(f"{name}:{hashlib.sha256(token.encode()).hexdigest()}")
    write_secret_file(book, "\n".join(lines) + "\n")


def _write_audit_key(root: Path) -> Path:
    """Generate the audit chain's HMAC key once: ``secrets/audit_key``, created mode 0600.

    The key lives outside the records database (that is the point of it); an existing key is
    kept, since events tagged with it must stay verifiable. A records database found without a
    key is renamed ``records.db.before-audit-key-<time>`` (its chain predates the key).
    """
    import os
    import secrets as pysecrets

    folder = root / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "audit_key"
    if not path.exists():
        # Records written before this stack had a key (a checkout from before the audit key, or
        # a deleted key) can never verify under the new one: set them aside, named, not mixed in.
        records_db = root / "records.db"
        if records_db.exists():
            kept = records_db.with_name(f"records.db.before-audit-key-{int(time.time())}")
            records_db.rename(kept)
            print(f"audit: a new audit key; the records written without it are kept in {kept}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pysecrets.token_hex(32) + "\n")
    return path


def approver_token(root: Path, name: str) -> str:
    """The local stack's token of person ``name`` (for the demo and the tests)."""
    return (root / "secrets" / f"approver-{name}.token").read_text().strip()


def _ensure_databases(port: int) -> None:
    """Create the ``prefect`` and ``app`` databases; seed ``app`` with a small sample schema."""
    import psycopg

    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for name in ("prefect", "app"):
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=app") as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS customers (id serial PRIMARY KEY, name text NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY,"
            " customer_id int REFERENCES customers(id), amount numeric(10,2) NOT NULL)"
        )
        (count,) = conn.execute("SELECT count(*) FROM customers").fetchone() or (0,)
        if count == 0:
            conn.execute(
                "INSERT INTO customers (name)"
                " SELECT 'customer ' || g FROM generate_series(1, 500) g"
            )
            conn.execute(
                "INSERT INTO orders (customer_id, amount)"
                " SELECT 1 + (g % 500), (g % 997) / 10.0 FROM generate_series(1, 3000) g"
            )


def _seed_host_config(host_root: Path, host: StackHost) -> None:
    """Give each host the configuration files backup-configuration collects."""
    etc = host_root / "etc" / "web"
    etc.mkdir(parents=True, exist_ok=True)
    conf = etc / "app.conf"
    if not conf.exists():
        conf.write_text(f"# web service on {host.name}\nlisten_port = {host.web_port}\n")
        (etc / "features.yaml").write_text("features:\n  new_checkout: false\n")


def _prepare_packages(root: Path, hosts: list[StackHost]) -> dict[str, Any] | None:
    """Give every host a real, private Debian package database and the stack's (empty) local
    repositories to patch it from (``kmpops.stack.apt_repo``), as root only and only where
    apt-get, dpkg and dpkg-scanpackages (dpkg-dev) exist; None otherwise (ops.yaml then has
    no ``packages``)."""
    import shutil

    tools = ("apt-get", "dpkg", "dpkg-scanpackages")
    if os.getuid() != 0 or not all(shutil.which(t) for t in tools):
        return None
    from kmpops.stack import apt_repo

    apt_repo.prepare_stack(root, [Path(h.root) for h in hosts])
    return {"repos": {name: str(apt_repo.stack_repo(root, name)) for name in apt_repo.STACK_REPOS}}


def _prepare_deploy_user(name: str, hosts: list[StackHost]) -> None:
    """Create the deploy user (once per machine) and give it what a deploy user owns on a
    real host: the deploy root (``srv``), the service's configuration (``etc/web``, restored by
    restore-configuration), its scratch (``tmp``) and its authorized_keys (provision-access
    edits it; ``etc/`` is group-writable and sticky for that). The host's sshd files and keys
    stay root's."""
    from kmpops.stack import deploy_user

    user = deploy_user.ensure_user(name)
    for host in hosts:
        host_root = Path(host.root)
        deploy_user.give_to([host_root / "srv", host_root / "etc" / "web", host_root / "tmp"], user)
        keys = host_root / "etc" / "authorized_keys"
        if keys.exists():
            os.chown(keys, user.pw_uid, user.pw_gid)
        # authorized_keys is replaced by rename (temp file beside it), so the deploy user
        # needs to write to etc/; sticky, like /tmp: it can replace only its own files, never
        # sshd's config or host key.
        os.chown(host_root / "etc", 0, user.pw_gid)
        os.chmod(host_root / "etc", 0o1775)  # noqa: S103 - group only, sticky


def _install_sudo_rules(info: StackInfo) -> Path:
    """Install the sudo rules of the stack's ops.yaml (``kmpops sudoers ENV`` for each
    environment), plus the sample service's restart without ``--port`` (the form some test
    variants configure); visudo-checked. Returns the file."""
    from kmpops.become import sudoers_rules
    from kmpops.config import load_config
    from kmpops.stack import deploy_user

    cfg = load_config(info.ops_yaml)
    extra: dict[str, list[list[str]]] = {}
    for env in cfg.environments.values():
        for host in env.hosts:
            path = cfg.service("web").deploy_path_for(host)
            extra[host.name] = [[f"{path}/current/control", "restart"]]
    text = "".join(sudoers_rules(cfg, env, extra=extra) for env in cfg.environments)
    return deploy_user.install_sudoers(Path(info.root), text)


def _plain(value: Any) -> dict[str, Any]:
    data = asdict(value) if hasattr(value, "__dataclass_fields__") else dict(value)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def _write(info: StackInfo) -> None:
    path = Path(info.root) / "stack.json"
    path.write_text(json.dumps(asdict(info), indent=2) + "\n")


def load(root: Path) -> StackInfo:
    """Read ``<root>/stack.json``; StackError if the stack was never started there."""
    path = root / "stack.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StackError(f"no stack at {root} ({err})") from None
    data["hosts"] = [StackHost(**h) for h in data.get("hosts", [])]
    return StackInfo(**data)


def _write_ops_yaml(info: StackInfo) -> None:
    root = Path(info.root)
    sink = f"jsonl://{info.notifications}"
    tokens = f"file:{root / 'secrets' / 'approver_tokens'}"

    def host_entry(h: StackHost) -> dict[str, Any]:
        return {
            "name": h.name,
            "address": "127.0.0.1",
            "port": h.port,
            "user": info.deploy_user or "root",
            "key_file": info.key_file,
            "known_hosts": info.known_hosts,
            "vars": {
                "root": h.root,
                "web_port": h.web_port,
                "authorized_keys": f"{h.root}/etc/authorized_keys",
            },
            **(
                {"jump": [{"address": info.bastion["address"], "port": info.bastion["port"]}]}
                if info.bastion
                else {}
            ),
        }

    def env_hosts(env: str) -> list[dict[str, Any]]:
        return [host_entry(h) for h in info.hosts if h.environment == env]

    cfg: dict[str, Any] = {
        "project": "kmp",
        "records": {
            "url": info.records_url,
            "audit_key": f"file:{root / 'secrets' / 'audit_key'}",
        },
        "notifications": {
            "routes": {"critical": [sink], "warning": [sink], "info": [sink]},
            "escalation": {"L1": [sink], "L2": [sink], "L3": [sink]},
            "ack_timeout": "15m",
            "responder_tokens": tokens,  # the local people are the on-call rota too
        },
        "environments": {
            "staging": {
                "hosts": env_hosts("staging"),
                "policy": {
                    "approval_required": False,
                    "approvers": ["alice", "bob", "carol"],
                    "approver_tokens": tokens,
                    "batch_size": "50%",
                    "max_failures": 0,
                    "inconclusive": "fail",
                },
            },
            "production": {
                "hosts": env_hosts("production"),
                "policy": {
                    "approval_required": True,
                    "approvers": ["alice", "bob", "carol"],
                    "approver_tokens": tokens,
                    "four_eyes": True,
                    "quorum": 1,
                    "approval_timeout": "10m",
                    "timeout_outcome": "reject",
                    "batch_size": "50%",
                    "max_failures": 0,
                    "bake_time": "5s",
                    "inconclusive": "pause",
                },
            },
        },
        "services": {
            "web": {
                "deploy_path": "{root}/srv/web",
                "keep_releases": 3,
                "restart": "{deploy_path}/current/control restart --port {web_port}",
                "health_check": {
                    "url": "http://{address}:{web_port}/health",
                    "retries": 20,
                    "interval": 0.25,
                },
                "metrics": {
                    "url": "http://{address}:{web_port}/metrics",
                    "prometheus_job": "web",
                    "error_rate_max": 0.01,
                },
                "config_paths": ["{root}/etc/web"],
                "integration_tests": [{"url": "http://{address}:{web_port}/work", "retries": 3}],
                "smoke_checks": [{"url": "http://{address}:{web_port}/version", "retries": 3}],
                "drain": "{deploy_path}/current/control drain",
                "undrain": "{deploy_path}/current/control undrain",
                # the local stack records the block; production runs e.g. an nft command
                "block_address": "mkdir -p {deploy_path}/shared"
                " && echo {address} >> {deploy_path}/shared/blocked-addresses",
                **SAMPLE_SERVICE_VERIFICATION,
            }
        },
        "alerts": {
            "high_cpu": {"threshold": "80%", "duration": "5m", "severity": "warning"},
            "error_rate": {
                "threshold": "1%",
                "duration": "1m",
                "severity": "critical",
                "query": (
                    "sum by (instance) (rate(web_errors_total[30s]))"
                    " / sum by (instance) (rate(web_requests_total[30s]))"
                ),
                # the same ratio from two scrapes, where no Prometheus is configured
                "scrape": {
                    "counter": {"metric": "web_errors_total"},
                    "per": {"metric": "web_requests_total"},
                },
            },
        },
        # containment from an alert's labels: a block no wider than a /24 and never one of
        # the stack's own addresses (every daemon and host of the local stack is on 127.0.0.1)
        "incidents": {
            "widest_block_v4": 24,
            "widest_block_v6": 64,
            "protected_addresses": ["127.0.0.1/32", "::1/128"],
            "known_keys": [],
        },
        "backups": {
            "database": {"schedule": "0 0 * * *", "retention": "30d", "type": "full"},
            "configuration": {"schedule": "0 */6 * * *", "retention": "7d", "type": "incremental"},
        },
    }
    if info.deploy_user:  # the deploy user restarts the service as root through sudo -n
        for env in cfg["environments"].values():
            env["become"] = True
    if info.apt:  # each host's private package state (kmpops.stack.apt_repo)
        for env in cfg["environments"].values():
            env["packages"] = {
                "manager": "apt",
                "apt_config": "{root}/etc/apt/kmpops-apt.conf",
                "dpkg_admindir": "{root}/var/lib/dpkg",
                "reboot_required_file": "{root}/var/run/reboot-required",
                "policy": {"security_sla_days": 7},
            }
    if info.s3:
        cfg["storage"] = {
            "backend": "s3",
            "bucket": info.s3.get("bucket", "kmp-ops"),
            "endpoint_url": info.s3["endpoint_url"],
            "region": "us-east-1",
            "access_key_id": f"file:{root / 'secrets' / 's3_access_key'}",
            "secret_access_key": f"file:{root / 'secrets' / 's3_secret_key'}",
        }
        cfg["records"]["checkpoints"] = {
            "backend": "s3",
            "bucket": info.s3.get("checkpoint_bucket", "kmp-ops-audit"),
            "prefix": "audit-checkpoints/",
            "retention": "400d",
        }
    else:
        cfg["storage"] = {"backend": "local", "path": str(root / "objects")}
        cfg["records"]["checkpoints"] = {
            "backend": "local",
            "path": str(root / "audit-checkpoints.jsonl"),
        }
    if info.postgres:
        cfg["databases"] = {
            "app": {
                "kind": "postgresql",
                "host": "127.0.0.1",
                "port": info.port_base + 200,
                "user": "postgres",
                "dbname": "app",
                "sanity_queries": ["SELECT count(*) FROM pg_catalog.pg_tables"],
                "rpo": "25h",
                "rto": "10m",
            }
        }
    if info.prometheus:
        cfg["prometheus"] = {"url": info.prometheus["url"]}
    Path(info.ops_yaml).write_text(
        "# Generated by `kmpops stack up` for the local stack. Valid kmp-ops configuration.\n"
        + yaml.dump(cfg, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
    )


# How the sample service is verified (its metric names live here and in ops.yaml, nowhere in
# the code): the error ratio from Prometheus (or a scrape of /metrics without one), new ERROR
# lines in its log, and test traffic on staging so that analysis has something to judge.
_REQUESTS = 'web_request_duration_seconds_count{job="web",instance=~"{instances}"}'
_ERRORS = 'web_errors_total{job="web",instance=~"{instances}"}'
SAMPLE_SERVICE_VERIFICATION: dict[str, Any] = {
    "analysis": [
        {
            "name": "error-ratio",
            "query": f"sum(increase({_ERRORS}[{{window}}]))"
            f" / sum(increase({_REQUESTS}[{{window}}]))",
            "requests_query": f"sum(increase({_REQUESTS}[{{window}}]))",
            "scrape": {
                "counter": {"metric": "web_errors_total"},
                "per": {"metric": "web_request_duration_seconds_count"},
            },
            "success": "< 0.05",
            "interval": "1s",
            "count": 2,
            "failure_limit": 0,
            "min_requests": 20,
        },
        {
            "name": "error-log",
            "log": {"path": "{deploy_path}/shared/log/web.log", "pattern": "ERROR"},
            "success": "<= 0",
            "interval": "1s",
            "count": 2,
        },
    ],
    "staging_tests": {
        "traffic": {
            "url": "http://{address}:{web_port}/work",
            "requests": 60,
            "concurrency": 4,
            "expect_status": [200],
        }
    },
    "evidence": {"min_tests": 1, "max_findings": {"critical": 0, "high": 0}, "max_outdated": 5},
}


def ci_evidence(version: str, sha256: str, *, author: str = "dave") -> dict[str, dict[str, Any]]:
    """Valid evidence records of the five evidence gates for one release artifact, as CI
    would write them to ``evidence/<service>/<version>/<gate>.json`` (the demo and the tests
    publish these)."""
    return {
        "code_review": {"sha256": sha256, "author": author, "approved_by": ["bob"]},
        "tests_passed": {"sha256": sha256, "passed": 412, "failed": 0},
        "security_scan": {
            "sha256": sha256,
            "scanner": "demo-scan",
            "findings": {"critical": 0, "high": 0, "medium": 2, "low": 7},
        },
        "dependencies_updated": {"sha256": sha256, "vulnerable": [], "outdated": 0},
        "documentation_updated": {
            "sha256": sha256,
            "changelog": {"version": version, "entry": f"Release {version} of the sample service."},
        },
    }


def down(root: Path) -> list[str]:
    """Stop every component under ``root`` by pid file; returns the names of what was stopped.

    That includes the deployments' serve process ``make demo`` leaves (``root/serve/serve.pid``)
    and the sample-service instances deploys started on the hosts.
    """
    root = root.resolve()
    stopped: list[str] = []
    from kmpops.stack._proc import stop_process

    # first what talks to the Prefect server: the demo's `kmpops serve` process
    if stop_process(root / "serve" / "serve.pid", timeout=15.0):
        stopped.append("serve")
    modules = (
        ("prefect", "prefect_server"),
        ("prometheus", "prometheus"),
        ("s3", "seaweed"),
        ("postgres", "postgres"),
    )
    import importlib

    for label, module in modules:
        try:
            mod = importlib.import_module(f"kmpops.stack.{module}")
        except ImportError:
            continue
        mod.stop(root)
        stopped.append(label)
    from kmpops.stack import sshd

    sshd.stop_fleet(root)
    stopped.append("sshd")
    _stop_sample_services(root)
    if os.getuid() == 0:
        from kmpops.stack import deploy_user

        deploy_user.remove_sudoers(root)  # `up` installs them again
    return stopped


def _stop_sample_services(root: Path) -> None:
    """Stop sample-service instances the deploy pipeline started on the stack's hosts."""
    from kmpops.stack._proc import stop_process

    for pid_file in (root / "hosts").glob("*/srv/*/shared/run/*.pid"):
        stop_process(pid_file, timeout=5)


def status(root: Path) -> dict[str, Any]:
    """Which processes of the stack under ``root`` are alive, by pid file."""
    root = root.resolve()
    alive: dict[str, Any] = {}
    for pid_file in pid_files(root):
        rel = str(pid_file.relative_to(root))
        alive[rel] = read_pid(pid_file) is not None
    return alive
