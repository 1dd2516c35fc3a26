"""incident-response end to end: real Prometheus, real sample service on real sshd hosts.

The sample service runs on ``prd-1``: release 1.0.0-inc (good), then 2.0.0-inc built with the
"errors" variant (30 % of requests answer 500) while a thread sends traffic. Prometheus scrapes it
every second; evaluate-alerts sees the error rate go pending -> firing and runs incident-response
as a subflow; a responder thread acknowledges the L1 page and approves the containment
(``resume_flow_run``); containment rolls prd-1 back to 1.0.0-inc over SSH, recovery re-evaluates
the rule until the alert resolves, and the postmortem carries the timeline. Escalation and
duplicate alerts are checked with manual incidents and short acknowledgement timeouts.
"""

from __future__ import annotations

import datetime
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.flows.alert_fixtures import ops_yaml_writer

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

HOST = "prd-1"
ERROR_RATE_QUERY = (
    "sum by (instance) (rate(web_errors_total[5s]))"
    " / sum by (instance) (rate(web_requests_total[5s]))"
)


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def incident_env(stack, tmp_path_factory, monkeypatch):
    """``configure(alerts, drop_prometheus=False)`` writes a variant of the stack's ops.yaml
    (module records store, own sink, 1 s ack timeout) and points KMPOPS_CONFIG at it."""
    root = tmp_path_factory.getbasetemp() / "incident-env"
    root.mkdir(exist_ok=True)
    return ops_yaml_writer(stack, root, monkeypatch, repeat_interval="1h")


def current_of(stack) -> str | None:
    link = Path(stack.host(HOST).root) / "srv" / "web" / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def deploy(stack, tarball: Path, version: str) -> None:
    """Put ``version`` live on prd-1 the way deploy-pipeline does (stage, switch, restart)."""
    from kmpops import become
    from kmpops import release as rel
    from kmpops.connectors.ssh import SSHConnection
    from kmpops.errors import CommandFailed
    from tasks.common import ops_config, records

    cfg = ops_config()
    env, host = cfg.host(HOST)
    svc = cfg.service("web")
    path = svc.deploy_path_for(host)
    with SSHConnection.from_host(host) as conn:
        rel.stage_release(conn, path, version, tarball, rel.file_sha256(tarball))
        rel.switch_current(conn, path, version)
        values = {**host.template_values(), "deploy_path": path}
        for attempt in range(3):
            # the web port sits in the kernel's ephemeral range on a shared machine: a client
            # socket of another process may hold it for a moment
            try:
                rel.restart_service(conn, become.service_command(svc, "restart", host, values))
                break
            except CommandFailed:
                if attempt == 2:
                    raise
                time.sleep(2)
    records().record_release(
        service="web", environment=env, host=HOST, version=version, deployed_by="release-bot"
    )


@pytest.fixture(scope="module")
def traffic(stack):
    """Keep requests flowing to prd-1 while the module runs."""
    from kmpops.stack.sample_service import generate_traffic

    stop = threading.Event()
    url = f"http://127.0.0.1:{stack.host(HOST).web_port}/work"

    def loop() -> None:
        while not stop.is_set():
            try:
                generate_traffic(url, requests=40, concurrency=2, timeout=2)
            except Exception:
                time.sleep(0.2)
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield url
    stop.set()
    thread.join(timeout=10)


@pytest.fixture
def bad_release(stack, incident_env, traffic, tmp_path):
    """1.0.0-inc (good) then 2.0.0-inc ("errors") live on prd-1; cleaned off the host afterwards."""
    from kmpops.stack.sample_service import build_release

    if current_of(stack) != "2.0.0-inc":
        deploy(stack, build_release("1.0.0-inc", tmp_path), "1.0.0-inc")
        deploy(
            stack,
            build_release("2.0.0-inc", tmp_path, variant="errors", parameter=0.3),
            "2.0.0-inc",
        )
    yield


@pytest.fixture(scope="module", autouse=True)
def _clean_host(stack):
    yield
    from kmpops.config import load_config

    cfg = load_config(stack.ops_yaml)
    _, host = cfg.host(HOST)
    path = cfg.service("web").deploy_path_for(host)
    # The service runs as root (restarted through sudo) and its run/log directories are root's:
    # the test, root on this machine, stops it by its pid file and removes the deploy path.
    from kmpops.stack._proc import stop_process

    stop_process(Path(path) / "shared" / "run" / "web.pid", timeout=10)
    shutil.rmtree(path, ignore_errors=True)


class Responder:
    """Answers paused incident-response / incident-escalation runs from a thread:
    acknowledgements by pause key (``ack-<incident>-<level>-…``), containment approvals
    otherwise."""

    def __init__(
        self,
        *,
        ack_level: str | None = "L1",
        responder: str = "alice",
        token: str = "",
        ack_token: str | None = None,
        via_cli: bool = False,
    ) -> None:
        """``token``: bob's approval token; ``ack_token``: the responder's (default: their own
        token from the stack); ``via_cli``: acknowledge through ``kmpops.approve.ack_run``."""
        from kmpops.stack import approver_token
        from tests.conftest import STACK_ROOT

        self.ack_level = ack_level
        self.token = token
        self.responder = responder
        self.ack_token = approver_token(STACK_ROOT, responder) if ack_token is None else ack_token
        self.via_cli = via_cli
        self.answered: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Responder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.flow_runs import resume_flow_run

        from kmpops.approve import pending_request

        seen: set = set()
        try:
            with get_client(sync_client=True) as client:
                while not self._stop.is_set():
                    runs = client.read_flow_runs(
                        flow_filter=FlowFilter(
                            name=FlowFilterName(any_=["incident-response", "incident-escalation"])
                        ),
                        flow_run_filter=FlowRunFilter(
                            state=FlowRunFilterState(
                                type=FlowRunFilterStateType(any_=[StateType.PAUSED])
                            )
                        ),
                    )
                    for run in runs:
                        state = run.state
                        if state is None or state.id in seen:
                            continue
                        key = state.state_details.pause_key or ""
                        if key.startswith("ack-"):
                            level = key.split("-")[2].upper()
                            if level != self.ack_level:
                                continue  # let this level time out
                            seen.add(state.id)
                            if self.via_cli:
                                from kmpops.approve import ack_run

                                ack_run(
                                    os.environ["PREFECT_API_URL"],
                                    str(run.id),
                                    responder=self.responder,
                                    token=self.ack_token,
                                    note="on it",
                                )
                            else:
                                resume_flow_run(
                                    run.id,
                                    run_input={
                                        "responder": self.responder,
                                        "responder_token": self.ack_token,
                                        "note": "on it",
                                    },
                                )
                            self.answered.append(f"ack {level}")
                        else:
                            seen.add(state.id)
                            code = pending_request(
                                os.environ["PREFECT_API_URL"], str(run.id)
                            ).request_code
                            resume_flow_run(
                                run.id,
                                run_input={
                                    "decision": "approve",
                                    "approver": "bob",
                                    "reason": "roll back the faulty release",
                                    "approver_token": self.token,
                                    "request_code": code,
                                },
                            )
                            self.answered.append("approve")
                    time.sleep(0.3)
        except BaseException as exc:
            self.errors.append(exc)


def timeline(incident_id: int) -> list[tuple[str, str]]:
    from tasks.common import records

    _, events = records().incident(incident_id)
    return [(e.phase, e.message) for e in events]


# -- tests ---------------------------------------------------------------------------------


def test_scrape_fallback_sees_the_error_rate(incident_env, bad_release, stack):
    """Without Prometheus, the error rate comes from two direct scrapes of each endpoint, with
    the metric names from the rule's ``scrape`` (kmp-ops assumes none)."""
    from flows.evaluate_alerts import evaluate_alerts

    incident_env(
        {
            "scraped_error_rate": {
                "threshold": "1%",
                "duration": "0s",
                "severity": "warning",
                "scrape": {
                    "counter": {"metric": "web_errors_total"},
                    "per": {"metric": "web_requests_total"},
                },
            }
        },
        drop_prometheus=True,
    )
    (summary,) = evaluate_alerts(rules=["scraped_error_rate"], start_incidents="none")
    instance = f"127.0.0.1:{stack.host(HOST).web_port}"
    key = f'scraped_error_rate{{instance="{instance}"}}'
    assert summary["active"] == {key: "firing"}, summary


def test_error_rate_alert_to_postmortem(incident_env, bad_release, stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.evaluate_alerts import evaluate_alerts
    from kmpops.connectors.notify import read_sink
    from kmpops.plans.incident import PHASES
    from tasks.common import records

    incident_env(
        {
            "error_rate": {
                "threshold": "1%",
                "duration": "3s",
                "severity": "critical",
                "query": ERROR_RATE_QUERY,
            }
        }
    )
    assert current_of(stack) == "2.0.0-inc"
    started = time.monotonic()
    from kmpops.stack import approver_token

    token = approver_token(Path(stack.root), "bob")
    with Responder(ack_level="L1", token=token) as responder:
        summaries = evaluate_alerts(
            rules=["error_rate"],
            start_incidents="subflow",
            rounds=60,
            interval_s=1,
            stop_when_firing=True,
            incident_options={
                "ack_timeout_s": 30,
                "approval_timeout_s": 60,
                "recovery_timeout_s": 60,
                "recovery_interval_s": 1,
            },
        )
    elapsed = time.monotonic() - started
    assert not responder.errors, responder.errors
    assert sorted(responder.answered) == ["ack L1", "approve"]

    changes = [c.split(": ", 1)[1] for s in summaries for c in s["changes"]]
    assert changes[:2] == ["inactive -> pending", "pending -> firing"], changes
    assert current_of(stack) == "1.0.0-inc"  # rolled back over SSH

    (incident,) = records().incidents()
    assert incident.state == "closed" and incident.severity == "critical"
    assert incident.alert_key.startswith('error_rate{instance="127.0.0.1:')
    lines = timeline(incident.id)
    phases = [p for p, _ in lines]
    assert phases[0] == "detection" and phases[-1] == "lessons_learned"
    # the six phases start in order (escalation lines run alongside the others, containment
    # may start while diagnostics are still being gathered)
    firsts = sorted(set(phases), key=phases.index)
    assert firsts == list(PHASES), lines
    assert set(phases) == set(PHASES)
    text = "\n".join(m for _, m in lines)
    assert "escalated to L1" in text and "acknowledged at L1 by alice" in text
    assert (
        "diagnostics gathered from prd-1" in text and "release 2.0.0-inc deployed on prd-1" in text
    )
    assert "rolled back prd-1: 2.0.0-inc -> 1.0.0-inc" in text
    assert "release 2.0.0-inc marked bad; known-good 1.0.0-inc confirmed" in text
    assert "resolved" in text and "prd-1 health: ok" in text

    metrics = incident.details["metrics"]
    assert 3 <= metrics["time_to_detect_s"] < 60
    assert 0 < metrics["time_to_contain_s"] <= metrics["time_to_recover_s"] < elapsed
    post = incident.details["postmortem"]
    assert "| containment | rolled back prd-1" in post and "| approved | bob |" in post
    (approval,) = [
        a
        for a in records().approvals(subject=f"incident/{incident.id}/containment")
        if a.details.get("kind") == "request"
    ]
    assert approval.outcome == "approved"

    with get_client(sync_client=True) as client:
        keys = [f"incident-{incident.id}-diagnostics", f"incident-{incident.id}-postmortem"]
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            sort=ArtifactSort.CREATED_DESC,
        )
    by_key: dict[str, object] = {}
    for art in arts:  # incident ids repeat across tests' records stores: newest wins
        by_key.setdefault(art.key, art.data)
    assert set(by_key) == set(keys)
    diag = by_key[keys[0]]
    for probe in ("uptime and load", "top processes by CPU", "memory", "disk", "service log"):
        assert f"### {probe}" in diag
    assert "load average" in diag and "Mem:" in diag and "2.0.0-inc" in diag
    assert "Time to recover" in by_key[keys[1]]

    titles = [m["title"] for m in read_sink(incident_env.sink)]
    assert any(t.startswith("[FIRING] error_rate") for t in titles)
    assert any(t.startswith(f"[L1] incident #{incident.id}") for t in titles)
    assert any(t.startswith("[RESOLVED] error_rate") for t in titles)
    actions = {e.action for e in records().audit_events(subject=f"incident/{incident.id}")}
    assert {"incident.opened", "incident.containment", "incident.postmortem"} <= actions


def test_unacknowledged_escalates_to_l3(incident_env):
    from flows.incident_response import incident_response
    from kmpops.connectors.notify import read_sink

    incident_env({})
    before = len(read_sink(incident_env.sink))
    result = incident_response(
        alert={"title": "disk filling on the backup host", "severity": "critical"},
        options={"ack_timeout_s": 1},
    )
    text = [m for _, m in timeline(result["incident_id"])]
    esc = [m for m in text if "L1" in m or "L2" in m or "L3" in m]
    assert esc == [
        "escalated to L1",
        "no acknowledgement at L1 within 1 s",
        "escalated to L2",
        "no acknowledgement at L2 within 1 s",
        "escalated to L3",
        "no acknowledgement at L3 within 1 s",
        "unacknowledged after L3",
    ]
    pages = [m["title"] for m in read_sink(incident_env.sink)[before:]]
    assert [p.split("]")[0] for p in pages] == ["[L1", "[L2", "[L3"]
    assert result["acknowledged_level"] is None


def test_acknowledged_at_l2(incident_env):
    from flows.incident_response import incident_response

    incident_env({})
    with Responder(ack_level="L2", responder="carol", via_cli=True) as responder:
        result = incident_response(
            alert={"title": "queue backlog", "severity": "warning"}, options={"ack_timeout_s": 2}
        )
    assert responder.answered == ["ack L2"]
    assert (result["acknowledged_level"], result["acknowledged_by"]) == ("L2", "carol")
    text = [m for _, m in timeline(result["incident_id"])]
    assert "no acknowledgement at L1 within 2 s" in text
    assert "acknowledged at L2 by carol" in text and "escalated to L3" not in text


def test_an_acknowledgement_without_the_responders_token_is_refused(incident_env):
    """Carol's name with a forged token does not take the page: the refusal is audited (no
    token in it), the stored answer is gone from Prefect, and the page escalates to L3."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.incident_response import incident_response
    from tasks.common import records

    incident_env({})
    # incident ids restart with each test's records store; the Prefect server is the session's
    started = datetime.datetime.now(datetime.UTC)
    forged = "not-carols-token-0123456789"
    with Responder(ack_level="L1", responder="carol", ack_token=forged) as responder:
        result = incident_response(
            alert={"title": "queue backlog", "severity": "warning"}, options={"ack_timeout_s": 6}
        )
    # every refused answer pauses L1 again for the time left, and the forger tries again
    assert responder.answered and set(responder.answered) == {"ack L1"}
    assert result["acknowledged_level"] is None and result["acknowledged_by"] is None
    text = [m for _, m in timeline(result["incident_id"])]
    assert "no acknowledgement at L1 within 6 s" in text and "unacknowledged after L3" in text
    refusals = [
        e
        for e in records().audit_events(action="incident.ack_refused")
        if e.subject == f"incident:{result['incident_id']}"
    ]
    assert len(refusals) == len(responder.answered)
    refused = refusals[-1]
    assert refused.subject == f"incident:{result['incident_id']}"
    assert refused.details["responder"] == "carol" and refused.details["level"] == "L1"
    assert "token is wrong" in refused.details["reason"]
    assert all(forged not in str(e.details) for e in records().audit_events())
    with get_client(sync_client=True) as client:
        (run,) = [
            r
            for r in client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["incident-escalation"]))
            )
            if r.parameters.get("incident_id") == result["incident_id"]
            and r.created is not None
            and r.created >= started
        ]
        stored = client.filter_flow_run_input(
            flow_run_id=run.id, key_prefix="paused-", limit=100, exclude_keys=set()
        )
    assert all(forged not in str(i.value) for i in stored)


def test_duplicate_alert_attaches_to_open_incident(incident_env):
    from flows.incident_response import incident_response
    from tasks.common import records

    incident_env({})
    alert = {"rule": "queue_depth", "labels": {"queue": "orders"}, "severity": "critical"}
    first: dict = {}

    def run_first() -> None:
        first.update(incident_response(alert=alert, options={"ack_timeout_s": 60}))

    thread = threading.Thread(target=run_first)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(i.alert_key == 'queue_depth{queue="orders"}' for i in records().incidents()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    duplicate = incident_response(alert=alert, options={"ack_timeout_s": 60})
    assert duplicate["duplicate"] is True
    with Responder(ack_level="L1"):
        thread.join(timeout=90)
    assert first["incident_id"] == duplicate["incident_id"] and first["duplicate"] is False
    text = [m for _, m in timeline(first["incident_id"])]
    assert 'duplicate alert queue_depth{queue="orders"} attached' in text
    assert "acknowledged at L1 by alice" in text


def test_maintenance_daily_opens_an_incident_for_a_critical_alert_once(incident_env):
    """A critical alert that turns firing during maintenance-daily opens one incident; the
    next evaluation (while it still fires) opens none."""
    from flows.evaluate_alerts import evaluate_alerts
    from flows.maintenance import maintenance_daily
    from tasks.common import records

    incident_env(
        {
            "outage": {
                "threshold": 0.5,
                "duration": "0s",
                "severity": "critical",
                "query": "vector(1)",
            }
        }
    )
    maintenance_daily(options={"environment": "staging", "verify_backups": False})
    opened = [i for i in records().incidents() if i.alert_key == "outage{}"]
    assert len(opened) == 1 and opened[0].severity == "critical"
    evaluate_alerts(rules=["outage"])
    evaluate_alerts(rules=["outage"], start_incidents="subflow")
    assert [i.id for i in records().incidents() if i.alert_key == "outage{}"] == [opened[0].id]
