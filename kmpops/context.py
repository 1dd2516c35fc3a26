"""One run's context — the composition root — without Prefect.

A procedure run builds one :class:`RunContext` when it starts and passes it down (the Prefect
side, ``tasks/context.py``, registers it under the flow run id): the validated config, frozen
for the run (:class:`ConfigSnapshot`, whose sha256 goes into the plan, the approval request and
the audit events); the records store; connectors with explicit lifetimes — one
:class:`~kmpops.connectors.ssh.Fleet` over the config's hosts (connections opened on first use,
one per host, closed when the context closes) and one object store; the run's identity; the
fences of the locks it holds. Nothing in it reloads: a config changed on disk since the run
began is *detected* (:meth:`RunContext.ensure_config_unchanged`) and refused, never used.

Like an httpx ``Client`` or Dagster's resources: a ``with`` block, built from a config object in
tests (:meth:`RunContext.from_config`) and from ops.yaml in production
(:meth:`ConfigSnapshot.load`). Two contexts never share a connection, so one run closing its
connections (a subflow ending, a rollback starting on fresh ones) cannot break another's.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from kmpops.config import Host, OpsConfig, ServiceConfig, load_config
from kmpops.connectors.ssh import Fleet, SSHConnection
from kmpops.errors import KmpOpsError, NotFound, PolicyViolation
from kmpops.locks import Fence
from kmpops.plans.approval import config_digest

__all__ = ["ConfigSnapshot", "ResolvedService", "RunContext", "digest_of_config"]

#: hosts worked on at once by a run's fleet (50 hosts' handshakes and uploads cost the daemons
#: ~25 % less CPU with 50 threads than with 16: bench/README.md)
FLEET_WORKERS = 64


def digest_of_config(cfg: OpsConfig) -> str:
    """sha256 of a validated config (secret values masked by the dump, so never part of it)."""
    return config_digest(cfg.model_dump(mode="json", by_alias=True))


def _file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, "" if it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True)
class ConfigSnapshot:
    """A validated config frozen for one run, its digest, and where it came from (``path``
    None: a config object handed over by the caller, e.g. a test)."""

    config: OpsConfig
    digest: str
    path: Path | None = None
    file_sha256: str = ""

    @classmethod
    def of(cls, cfg: OpsConfig) -> ConfigSnapshot:
        """A snapshot of a config object (nothing on disk to compare it with later)."""
        return cls(cfg, digest_of_config(cfg))

    @classmethod
    def load(cls, path: Path, *, loaded: OpsConfig | None = None) -> ConfigSnapshot:
        """Load and validate ``path`` (or take ``loaded``, a config just loaded from it).
        The file's bytes are hashed *before* the load, so an edit in between shows as a
        change later. Raises ConfigError (naming the bad field) or OSError."""
        raw = _file_sha256(path)
        cfg = loaded if loaded is not None else load_config(path)
        return cls(cfg, digest_of_config(cfg), path, raw)

    def change(self) -> str | None:
        """None while the config this snapshot came from is still the same (same bytes, or
        bytes that validate to the same digest); otherwise what changed, in words."""
        if self.path is None:
            return None
        if self.file_sha256 and _file_sha256(self.path) == self.file_sha256:
            return None  # the very bytes it was loaded from: no need to parse it again
        try:
            now = digest_of_config(load_config(self.path))
        except (KmpOpsError, OSError, ValueError) as exc:
            return f"the config no longer loads ({exc})"
        if now != self.digest:
            return (
                f"the config changed since the plan was approved (config digest "
                f"{self.digest[:12]} -> {now[:12]})"
            )
        return None


@dataclass(frozen=True)
class ResolvedService:
    """A service resolved once from the run's config: its name and its frozen model."""

    name: str
    config: ServiceConfig

    def deploy_path_for(self, host: Host) -> str:
        """Where the service lives on ``host`` (see ``ServiceConfig.deploy_path_for``)."""
        return self.config.deploy_path_for(host)


class RunContext:
    """Everything one run works with, built once, closed once; a context manager.

    ``records`` is given (a store already migrated, shared by the process) or built from the
    config on first use. ``resolve_secret`` turns a configured secret reference into its value
    (default: :func:`kmpops.secrets.resolve_secret`). ``connect`` builds a host's connection
    (default: ``SSHConnection.from_host`` with the config's SSH bounds). The fleet and the
    store connect lazily; :meth:`close` (or leaving the ``with`` block) closes both. Safe to
    use from several threads (one user at a time per host connection).
    """

    def __init__(
        self,
        snapshot: ConfigSnapshot,
        *,
        run_id: str | None = None,
        identity: str = "kmp-ops",
        records: Any = None,
        records_factory: Callable[[OpsConfig], Any] | None = None,
        resolve_secret: Callable[[Any], str] | None = None,
        connect: Callable[[Any], SSHConnection] | None = None,
        fleet_workers: int = FLEET_WORKERS,
    ) -> None:
        self.snapshot = snapshot
        self.run_id = run_id
        self.identity = identity
        self._records = records
        self._records_factory = records_factory
        self._resolve_secret = resolve_secret
        self._lock = threading.Lock()
        self._store: Any = None
        self._fences: dict[str, Fence] = {}
        cfg = snapshot.config
        ssh = cfg.timeouts.ssh_options()
        self._hosts: dict[str, tuple[str, Host]] = {
            h.name: (env_name, h) for env_name, env in cfg.environments.items() for h in env.hosts
        }
        self.fleet = Fleet(
            [h for _, h in self._hosts.values()],
            max_workers=fleet_workers,
            connect=connect or (lambda host: SSHConnection.from_host(host, **ssh)),
        )
        self._entered = False
        self._closed = False

    @classmethod
    def from_config(cls, cfg: OpsConfig, **options: Any) -> RunContext:
        """A context over a config object (no ops.yaml needed): ``RunContext(ConfigSnapshot.
        of(cfg), **options)``."""
        return cls(ConfigSnapshot.of(cfg), **options)

    # -- the frozen config ----------------------------------------------------------------

    @property
    def config(self) -> OpsConfig:
        """The validated config, frozen for the run."""
        return self.snapshot.config

    @property
    def digest(self) -> str:
        """sha256 of :attr:`config` (in the plan, the approval request, the audit events)."""
        return self.snapshot.digest

    def ensure_config_unchanged(self, what: str) -> str:
        """Raise PolicyViolation naming ``what`` if the config this run was planned on changed
        on disk (or no longer loads); return its digest otherwise. Called between an approval
        and the change it approved: re-plan and re-approve in a new run."""
        change = self.snapshot.change()
        if change is not None:
            raise PolicyViolation(f"{what}: {change}; re-plan and re-approve in a new run")
        return self.digest

    def service(self, name: str) -> ResolvedService:
        """The service ``name`` of the frozen config; NotFound names the known ones."""
        try:
            return ResolvedService(name, self.config.services[name])
        except KeyError:
            known = ", ".join(sorted(self.config.services)) or "none"
            raise NotFound(f"unknown service {name!r} (known: {known})") from None

    def hosts(self, environment: str) -> list[Host]:
        """The hosts of ``environment``, in config order; NotFound names the known ones."""
        try:
            return list(self.config.environments[environment].hosts)
        except KeyError:
            known = ", ".join(sorted(self.config.environments)) or "none"
            raise NotFound(f"unknown environment {environment!r} (known: {known})") from None

    def host(self, name: str, environment: str | None = None) -> Host:
        """The host ``name`` (of ``environment`` when given); NotFound otherwise."""
        found = self._hosts.get(name)
        if found is None or (environment is not None and found[0] != environment):
            where = f" in environment {environment!r}" if environment else ""
            raise NotFound(f"host {name!r} is not{where} in the config")
        return found[1]

    def environment_of(self, host_name: str) -> str:
        """The environment host ``host_name`` belongs to; NotFound otherwise."""
        found = self._hosts.get(host_name)
        if found is None:
            raise NotFound(f"host {host_name!r} is not in the config")
        return found[0]

    # -- connectors -----------------------------------------------------------------------

    @property
    def records(self) -> Any:
        """The records store (given, or built from the config and migrated on first use)."""
        with self._lock:
            if self._records is None:
                if self._records_factory is not None:
                    self._records = self._records_factory(self.config)
                else:
                    from kmpops.records import Records

                    self._records = Records.from_config(self.config)
                    self._records.migrate()
            return self._records

    @property
    def store(self) -> Any:
        """The run's one object store (opened on first use); NotFound if none is configured."""
        with self._lock:
            if self._store is None:
                if self.config.storage is None:
                    raise NotFound("no storage configured in ops.yaml")
                from kmpops.connectors.storage import open_store

                resolve = self._resolve_secret
                if resolve is None:
                    from kmpops.secrets import resolve_secret as resolve
                self._store = open_store(self.config.storage, resolve)
            return self._store

    # -- locks ----------------------------------------------------------------------------

    def hold(self, fences: Iterable[Fence]) -> None:
        """Record fences of leases the run now holds."""
        with self._lock:
            self._fences.update({f.target: f for f in fences})

    def drop(self, targets: Iterable[str]) -> None:
        """Forget the fences of released leases."""
        with self._lock:
            for target in targets:
                self._fences.pop(target, None)

    def fence(self, target: str) -> Fence | None:
        """The fence the run holds on ``target`` (None: it holds no lease on it)."""
        with self._lock:
            return self._fences.get(target)

    @property
    def fences(self) -> Mapping[str, Fence]:
        """Every fence the run holds (a copy)."""
        with self._lock:
            return dict(self._fences)

    # -- lifetime -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._closed:
            raise RuntimeError("this run context is closed")
        self.fleet.__enter__()
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the run's connections (fleet and store); idempotent. The records store is the
        process's and stays open."""
        if self._closed:
            return
        self._closed = True
        if self._entered:
            self.fleet.__exit__(None, None, None)
        else:
            self.fleet.close()
        with self._lock:
            store, self._store = self._store, None
        close = getattr(store, "close", None)
        if callable(close):
            close()
