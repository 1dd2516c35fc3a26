"""The run context on the real stack: one context per flow run, its connections its own.

A flow run builds its context once (``tasks.context``): the frozen config, the records store,
one ``Fleet`` for its hosts, one object store, its identity and locks. Two runs in the same
process (a subflow, a test's threads, a served deployment's runs) never share or close each
other's connections.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

RELEASES = {"C1.0": "good", "C2.0": "good", "C3.0": "good", "C4.0": "unhealthy"}

#: the web health check, plus: on a host whose ``tmp/`` holds ``hold``, say so (``held``) and
#: wait (up to 15 s) for ``go`` — how a test keeps one host's command in flight for as long as it
#: needs to, without timing anything (tmp/: the deploy user may write there)
HOLDING_HEALTH = (
    "{deploy_path}/current/control health --port {web_port} && "
    "if [ -f {root}/tmp/hold ]; then touch {root}/tmp/held; "
    "for i in $(seq 150); do [ -f {root}/tmp/go ] && break; sleep 0.1; done; "
    "rm -f {root}/tmp/hold; fi"
)


def current_of(host_root: str) -> str | None:
    link = Path(host_root) / "srv" / "web" / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def context_variant(data: dict) -> None:
    """No approval, no analysis, no staging tests (these tests are about connections), the
    holding health check; the staging hosts form an environment ``preprod`` of their own (a
    deploy to production does not go through it)."""
    data["environments"]["preprod"] = data["environments"].pop("staging")
    for env in data["environments"].values():
        env["policy"].update(approval_required=False)
    web = data["services"]["web"]
    web.pop("analysis", None)
    web.pop("staging_tests", None)
    # the held probe waits (up to 15 s) for the other run to end: its timeout is longer
    web["health_check"] = {"command": HOLDING_HEALTH, "retries": 1, "timeout": 30}


@pytest.fixture(scope="module")
def context_config(stack, tmp_path_factory) -> Path:
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    context_variant(data)
    path = tmp_path_factory.mktemp("context") / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def use_context_config(context_config, monkeypatch) -> Path:
    monkeypatch.setenv("KMPOPS_CONFIG", str(context_config))
    return context_config


@pytest.fixture(scope="module")
def context_releases(stack, tmp_path_factory) -> dict[str, str]:
    """Publish this module's releases (tarball + checklist evidence) to the stack's S3."""
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release

    out = tmp_path_factory.mktemp("context-releases")
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    for version, variant in RELEASES.items():
        tarball = build_release(version, out, variant=variant)
        put = store.put_bytes(f"releases/web/{version}.tar.gz", tarball.read_bytes())
        for gate, record in ci_evidence(version, put.sha256).items():
            store.put_bytes(f"evidence/web/{version}/{gate}.json", json.dumps(record).encode())
    return RELEASES


@pytest.fixture(scope="module")
def context_baseline(stack, context_releases, context_config) -> None:
    """C1.0 on every host (a first install where a host has nothing yet)."""
    from tests.flows.ops_variant import first_install

    first_install(context_config, "C1.0")


def wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {seconds:g}s")
        time.sleep(0.05)


def test_another_run_in_the_same_process_does_not_close_a_deploys_connections(
    stack, context_baseline, use_context_config
):
    """A deploy to preprod is in the middle of a host's health check when another run in the
    same process (a dry run of production, other hosts) ends: the deploy goes on, on its own
    connections (it used to share a process-wide pool that the other run closed)."""
    from flows.deploy_pipeline import DeployRequest, deploy_pipeline

    preprod = [h for h in stack.hosts if h.environment == "staging"]  # the stack's name for them
    held = preprod[0]
    for name in ("hold", "held", "go"):
        Path(held.root, "tmp", name).unlink(missing_ok=True)
    Path(held.root, "tmp", "hold").touch()
    states: list = []

    def deploy() -> None:
        states.append(
            deploy_pipeline(
                DeployRequest(
                    service="web",
                    version="C2.0",
                    environment="preprod",
                    bake_seconds=0,
                    requested_by="dave",
                    allow_first_install=True,
                ),
                return_state=True,
            )
        )

    thread = threading.Thread(target=deploy, daemon=True)
    thread.start()
    try:
        wait_for(Path(held.root, "tmp", "held"))  # the deploy's health command is in flight there
        other = deploy_pipeline(
            DeployRequest(
                service="web",
                version="C3.0",
                environment="production",
                dry_run=True,
                requested_by="dave",
            )
        )
        assert other["status"] == "dry_run"
    finally:
        Path(held.root, "tmp", "go").touch()
        thread.join(120)
    assert not thread.is_alive()
    (state,) = states
    assert state.is_completed(), f"{state.message} {state.result(raise_on_failure=False)}"
    assert {current_of(h.root) for h in preprod} == {"C2.0"}


def test_two_contexts_over_one_config_never_share_a_connection(stack, ops_config):
    """The Prefect-free part: each context's fleet is its own; closing one (a run ending)
    leaves the other's connections open and working."""
    from kmpops.context import RunContext

    name = next(h.name for h in stack.hosts if h.environment == "production")
    with RunContext.from_config(ops_config) as a:
        with RunContext.from_config(ops_config) as b:
            a.fleet.warm([name])  # connects in the background; the step waits for it
            with a.fleet.using(name) as conn_a:
                assert conn_a.run("echo a").stdout.strip() == "a"
            with b.fleet.using(name) as conn_b:
                assert conn_b.run("echo b").stdout.strip() == "b"
            assert conn_a is not conn_b
        assert not conn_b.connected  # b closed its own
        assert conn_a.connected  # a's is untouched
        assert conn_a.run("echo still").stdout.strip() == "still"
    assert not conn_a.connected
