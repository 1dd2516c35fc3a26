"""patch-hosts on the real stack: real apt-get and dpkg on each host's private package database.

Every host of the session stack has its own dpkg database and apt state under its root
(``kmpops.stack.apt_repo``) and sources the stack's two local repositories, which this module
fills with packages it builds with ``dpkg-deb``: a newer version of an installed package, a
security update (from the repository whose Release says Suite ``bookworm-security``, Label
``Debian-Security``), and one whose ``postinst`` fails on the hosts a test marks. The flow
reaches the hosts over SSH as the deploy user, package commands run as root through ``sudo -n``
and the stack's exact rules. Assertions read the hosts' databases (``dpkg-query --admindir``),
the records store and the approvals; the machine's own package database is checked unchanged.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.stack, pytest.mark.prefect]

FAIL_MARKER = "etc/kmpops-test/fail-postinst"


def machine_packages() -> tuple[str, str]:
    """This machine's own package list and the sha256 of its dpkg status file."""
    listing = subprocess.run(["dpkg", "-l"], capture_output=True, text=True, check=True).stdout
    status = hashlib.sha256(Path("/var/lib/dpkg/status").read_bytes()).hexdigest()
    return listing, status


def versions(host) -> dict[str, tuple[str, str]]:
    """package -> (version, status) read from the host's own dpkg database."""
    out = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={host.root}/var/lib/dpkg",
            "-W",
            "-f",
            "${Package}\t${Version}\t${db:Status-Abbrev}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        name, version, status = line.split("\t")
        if version:
            found[name] = (version, status.strip())
    return found


def version_of(host, package: str) -> str | None:
    got = versions(host).get(package)
    return got[0] if got else None


@pytest.fixture(scope="module")
def machine_before():
    return machine_packages()


@pytest.fixture(scope="module")
def packages(stack, machine_before, tmp_path_factory):
    """The test packages built, published to the stack's repositories, and the old versions
    installed on every host; on teardown the hosts' test packages are purged and the
    repositories emptied (later test files see clean hosts)."""
    # make test runs as root with apt-get, dpkg and dpkg-dev installed: a stack without
    # package state is a broken setup, not a reason to prove nothing
    assert getattr(stack, "apt", None), (
        "the stack has no package state: run as root with apt-get, dpkg and dpkg-scanpackages "
        "(dpkg-dev; `make test` installs it)"
    )
    from kmpops.stack import apt_repo

    out = tmp_path_factory.mktemp("debs")
    build = apt_repo.build_package
    debs = {
        ("kmp-tool", "1.0-1"): build(out, "kmp-tool", "1.0-1"),
        ("kmp-tool", "1.1-1"): build(out, "kmp-tool", "1.1-1"),
        ("kmp-agent", "2.0-1"): build(out, "kmp-agent", "2.0-1"),
        ("kmp-agent", "2.1-1"): build(out, "kmp-agent", "2.1-1", postinst_fails_if=FAIL_MARKER),
        ("kmp-libssl", "3.0.1-1"): build(out, "kmp-libssl", "3.0.1-1"),
        ("kmp-libssl", "3.0.1-2"): build(out, "kmp-libssl", "3.0.1-2", reboot_required=True),
        ("kmp-zlib", "1.2-1"): build(out, "kmp-zlib", "1.2-1"),
        ("kmp-zlib", "1.2-2"): build(out, "kmp-zlib", "1.2-2"),
        ("kmp-broken", "1.0-1"): build(out, "kmp-broken", "1.0-1", postinst_fails=True),
    }
    main = apt_repo.stack_repo(stack.root, "main")
    security = apt_repo.stack_repo(stack.root, "security")
    apt_repo.publish_repo(
        main,
        [
            debs[k]
            for k in (
                ("kmp-tool", "1.0-1"),
                ("kmp-tool", "1.1-1"),
                ("kmp-agent", "2.0-1"),
                ("kmp-agent", "2.1-1"),
                ("kmp-libssl", "3.0.1-1"),
            )
        ],
        apt_repo.STACK_REPOS["main"],
    )
    # dated 40 days ago (apt keeps the Release it has when a new one is older, so a later
    # publication must carry a Date no older than this one)
    apt_repo.publish_repo(
        security,
        [debs[("kmp-libssl", "3.0.1-2")]],
        apt_repo.STACK_REPOS["security"],
        date=datetime.now(UTC) - timedelta(days=40),
    )
    base = [debs[("kmp-tool", "1.0-1")], debs[("kmp-agent", "2.0-1")]]
    base.append(debs[("kmp-libssl", "3.0.1-1")])
    for host in stack.hosts:
        apt_repo.install_directly(Path(host.root), base)
    yield {"debs": debs, "main": main, "security": security, "out": out}
    for host in stack.hosts:
        root = Path(host.root)
        (root / FAIL_MARKER).unlink(missing_ok=True)
        for name in ("reboot-required", "reboot-required.pkgs"):
            (root / "var/run" / name).unlink(missing_ok=True)
        installed = [p for p in versions(host) if p.startswith("kmp-")]
        if installed:
            subprocess.run(
                [
                    "dpkg",
                    f"--root={root}",
                    f"--admindir={root}/var/lib/dpkg",
                    "--force-script-chrootless",
                    "--force-remove-reinstreq",
                    "--purge",
                    *installed,
                ],
                capture_output=True,
                check=False,
            )
    for repo in (main, security):
        for deb in repo.glob("*.deb"):
            deb.unlink()
    apt_repo.publish_repo(main, (), apt_repo.STACK_REPOS["main"])
    apt_repo.publish_repo(security, (), apt_repo.STACK_REPOS["security"])


@pytest.fixture(scope="module")
def baseline(stack, packages, tmp_path_factory):
    """The web service 1.0.0 on every host (the patch's health checks judge it)."""
    from kmpops.config import load_config
    from kmpops.connectors.storage import open_store
    from kmpops.secrets import resolve_secret
    from kmpops.stack import ci_evidence
    from kmpops.stack.sample_service import build_release
    from tests.flows.ops_variant import first_install

    out = tmp_path_factory.mktemp("release")
    store = open_store(load_config(stack.ops_yaml).storage, resolve_secret)
    tarball = build_release("1.0.0", out)
    put = store.put_bytes("releases/web/1.0.0.tar.gz", tarball.read_bytes())
    for gate, record in ci_evidence("1.0.0", put.sha256).items():
        store.put_bytes(f"evidence/web/1.0.0/{gate}.json", json.dumps(record).encode())
    data = yaml.safe_load(Path(stack.ops_yaml).read_text())
    data["environments"]["production"]["policy"]["approval_required"] = False
    data["services"]["web"].pop("analysis", None)
    path = out / "ops.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    first_install(path)


@pytest.fixture
def variant(monkeypatch, stack, tmp_path):
    from tests.flows.ops_variant import ops_yaml_variant

    return ops_yaml_variant(stack, tmp_path, monkeypatch)


def answer_approval(stack, answers, *, requester="dave", prefix="patch ") -> threading.Thread:
    """Answer the next pending approval whose subject starts with ``prefix``: the requester
    confirms with their own token, then each ``(approver, decision)`` with theirs."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from kmpops.approve import pending_request
    from kmpops.stack import approver_token
    from tasks.common import records

    stale = {a.id for a in records().approvals() if a.outcome == "pending"}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            deadline = time.monotonic() + 120
            run_id = None
            while run_id is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("no pending approval")
                pending = [
                    a
                    for a in records().approvals()
                    if a.outcome == "pending" and a.subject.startswith(prefix) and a.id not in stale
                ]
                run_id = pending[-1].run_id if pending else None
                time.sleep(0.2)
            seen: set = set()
            for who, decision in [(requester, "confirm"), *answers]:
                with get_client(sync_client=True) as client:
                    while True:
                        state = client.read_flow_run(run_id).state
                        if state.is_paused() and state.id not in seen:
                            seen.add(state.id)
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError("the run did not pause")
                        time.sleep(0.1)
                code = pending_request(
                    __import__("os").environ["PREFECT_API_URL"], run_id
                ).request_code
                resume_flow_run(
                    run_id,
                    run_input={
                        "decision": decision,
                        "approver": who,
                        "reason": "patch ok",
                        "approver_token": approver_token(Path(stack.root), who),
                        "request_code": code,
                    },
                )
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def no_analysis(data) -> None:
    data["services"]["web"].pop("analysis", None)
    data["services"]["web"].pop("staging_tests", None)


def run_patch(**kwargs):
    from flows.patch_hosts import PatchRequest, patch_hosts

    kwargs.setdefault("requested_by", "dave")
    return patch_hosts(PatchRequest(**kwargs), return_state=True)


# -- tests ---------------------------------------------------------------------------------


def test_pending_updates_listed_from_real_apt_state(stack, packages, variant) -> None:
    variant(no_analysis)
    before = {h.name: versions(h) for h in stack.hosts}
    state = run_patch(kind="all", dry_run=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "dry_run"
    for host in stack.hosts:
        pending = {u["package"]: u for u in result["pending"][host.environment][host.name]}
        assert pending["kmp-libssl"]["security"] is True
        assert (pending["kmp-libssl"]["installed"], pending["kmp-libssl"]["candidate"]) == (
            "3.0.1-1",
            "3.0.1-2",
        )
        assert pending["kmp-tool"]["security"] is False
        assert pending["kmp-tool"]["candidate"] == "1.1-1"
        assert pending["kmp-agent"]["candidate"] == "2.1-1"
        # security first in every host's plan, each version pinned
        assert result["plan"][host.environment][host.name][0] == "kmp-libssl=3.0.1-2"
    assert result["blast_radius"] == f"{len(stack.hosts)}/{len(stack.hosts)} hosts (100%)"
    assert {h.name: versions(h) for h in stack.hosts} == before  # a dry run changes nothing


def test_bad_package_name_is_refused_before_anything_changes(stack, packages, variant) -> None:
    from pydantic import ValidationError

    from flows.patch_hosts import PatchRequest
    from tasks.common import records

    variant(no_analysis)
    before = {h.name: versions(h) for h in stack.hosts}
    requested = len(records().audit_events(action="patch.requested"))
    for bad in ("kmp-tool; id", "-oAPT::Update::Pre-Invoke::=id", "kmp tool", "../etc"):
        with pytest.raises(ValidationError, match="not a package name"):
            PatchRequest(packages=[bad])
    # the same through the flow's parameters (what the UI or API sends)
    from flows.patch_hosts import patch_hosts

    with pytest.raises(Exception, match="not a package name"):
        patch_hosts(request={"packages": ["kmp-tool=1.1-1 -oDPkg::Pre-Invoke::=id"]})
    assert {h.name: versions(h) for h in stack.hosts} == before
    assert len(records().audit_events(action="patch.requested")) == requested


def test_missing_sudo_rule_fails_fast_naming_the_command(stack, packages, variant) -> None:
    """A packages config whose apt-get words no installed rule names: refused by sudo -n at
    once, the command named, nothing changed."""
    before = {h.name: versions(h) for h in stack.hosts}

    def other_apt(data) -> None:
        no_analysis(data)
        for env in data["environments"].values():
            env["packages"]["apt_get"] = "/usr/bin/apt"

    variant(other_apt)
    started = time.monotonic()
    state = run_patch(kind="all")
    assert state.is_failed()
    text = f"{state.message} {state.result(raise_on_failure=False)}"
    assert "sudo -n refused" in text and "/usr/bin/apt" in text and "update" in text
    assert time.monotonic() - started < 60
    assert {h.name: versions(h) for h in stack.hosts} == before


def test_security_update_rolled_out_in_batches(stack, packages, baseline, variant) -> None:
    """Staging is judged by the web service's own staging tests and analysis (Prometheus)."""
    from tasks.common import records
    from tests.conftest import give_to_deploy_user

    variant(lambda d: None)
    # error lines the service logged before this patch are not the patch's (the analysis
    # counted the whole log when the suite's earlier tests had left errors in it)
    for host in stack.hosts:
        if host.environment == "staging":
            log = Path(host.root) / "srv/web/shared/log/web.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as out:
                out.write("2026-12-01 00:00:00 ERROR an error from before the patch\n" * 5)
            give_to_deploy_user(stack, log.parent.parent)
    answering = answer_approval(stack, [("alice", "approve")])
    state = run_patch(kind="security")
    answering.join(30)
    assert not answering.errors, answering.errors
    assert state.is_completed(), f"{state.message} {state.result(raise_on_failure=False)}"
    result = state.result()
    run_id = str(state.state_details.flow_run_id)
    for host in stack.hosts:
        got = versions(host)
        assert got["kmp-libssl"] == ("3.0.1-2", "ii"), host.name
        assert got["kmp-tool"][0] == "1.0-1" and got["kmp-agent"][0] == "2.0-1"  # security only
        assert (Path(host.root) / "var/run/reboot-required").exists()
    rows = records().package_changes(run_id=run_id)
    assert {(r.host, r.package, r.from_version, r.after_version, r.outcome) for r in rows} == {
        (h.name, "kmp-libssl", "3.0.1-1", "3.0.1-2", "installed") for h in stack.hosts
    }
    batches = {r.host: r.batch for r in rows}
    assert {batches[h.name] for h in stack.hosts if h.environment == "staging"} == {"staging"}
    prod = sorted(batches[h.name] for h in stack.hosts if h.environment == "production")
    assert prod == ["batch 1/2", "batch 1/2", "batch 2/2", "batch 2/2"]
    approvals = [a for a in records().approvals(run_id=run_id) if a.outcome == "approved"]
    assert approvals and approvals[-1].approver == "alice"
    assert approvals[-1].approver != approvals[-1].requested_by == "dave"
    assert all(v["patched"] for v in result["verification"])
    actions = [e.action for e in records().audit_events(run_id=run_id)]
    for action in ("patch.requested", "patch.assessed", "patch.host", "patch.completed"):
        assert action in actions
    analyses = records().audit_events(action="deploy.analysis", run_id=run_id)
    assert [a.details["outcome"] for a in analyses] == ["passed"]
    assert any("analysis of web on staging" in n for n in result["notes"])
    # the next look shows the reboot the libssl update asked for, and nothing security pending
    again = run_patch(kind="security", dry_run=True).result()
    assert set(again["reboot_required"]) == {h.name for h in stack.hosts}
    assert again["plan"] == {"staging": {}, "production": {}}


def test_failing_postinst_stops_batch_2(stack, packages, baseline, variant) -> None:
    """Batches of one host: prd-2's postinst fails. prd-1 stays patched (verified), prd-2 is put
    back with a pinned downgrade, prd-3 and prd-4 are never touched."""
    from flows.patch_hosts import PatchFailed
    from tasks.common import records

    def one_by_one(data) -> None:
        no_analysis(data)
        data["environments"]["production"]["policy"]["batch_size"] = 1

    variant(one_by_one)
    prd = {h.name: h for h in stack.hosts if h.environment == "production"}
    marker = Path(prd["prd-2"].root) / FAIL_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("this host's postinst fails\n")
    answering = answer_approval(stack, [("bob", "approve")])
    state = run_patch(kind="all", packages=["kmp-agent"])
    answering.join(30)
    assert not answering.errors, answering.errors
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PatchFailed)
    assert "batch 2/4" in str(error) and "prd-2" in str(error)
    assert "kmp-agent 2.0-1 -> 2.1-1" in str(error)  # versions before and after
    assert "put back kmp-agent" in str(error)
    assert versions(prd["prd-1"])["kmp-agent"] == ("2.1-1", "ii")
    assert versions(prd["prd-2"])["kmp-agent"] == ("2.0-1", "ii")
    for name in ("prd-3", "prd-4"):
        assert versions(prd[name])["kmp-agent"] == ("2.0-1", "ii")
    run_id = str(state.state_details.flow_run_id)
    rows = records().package_changes(run_id=run_id)
    outcomes = {(r.host, r.outcome) for r in rows}
    assert ("prd-1", "installed") in outcomes
    assert {("prd-2", "failed"), ("prd-2", "reverted")} <= outcomes
    assert not {r.host for r in rows} & {"prd-3", "prd-4"}
    failed = records().audit_events(action="patch.failed", run_id=run_id)
    assert failed and failed[-1].details["untouched"] == ["prd-3", "prd-4"]


def test_batch_that_cannot_be_put_back_is_flagged(stack, packages, baseline, variant) -> None:
    """A package whose postinst always fails and which was never installed before: staging
    fails, apt cannot put it back (there is no version to go back to), the host is flagged,
    production is never touched."""
    from flows.patch_hosts import PatchFailed
    from kmpops.stack import apt_repo
    from tasks.common import records

    variant(no_analysis)
    stg = [h for h in stack.hosts if h.environment == "staging"]
    # kmp-broken 1.0-1 is installed on staging only as a pending "upgrade" from 0.9-1, which
    # is in no repository: the pinned downgrade has nowhere to go
    old = apt_repo.build_package(packages["out"], "kmp-broken", "0.9-1")
    for host in stg:
        apt_repo.install_directly(Path(host.root), [old])
    apt_repo.publish_repo(
        packages["main"], [packages["debs"][("kmp-broken", "1.0-1")]], apt_repo.STACK_REPOS["main"]
    )
    before_prod = {h.name: versions(h) for h in stack.hosts if h.environment == "production"}
    state = run_patch(kind="all", packages=["kmp-broken"])
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PatchFailed) and "staging" in str(error)
    assert "FLAGGED" in str(error) and "kmp-broken" in str(error)
    run_id = str(state.state_details.flow_run_id)
    flagged = {r.host for r in records().package_changes(run_id=run_id) if r.outcome == "flagged"}
    assert flagged == {h.name for h in stg}
    assert {
        h.name: versions(h) for h in stack.hosts if h.environment == "production"
    } == before_prod
    for host in stg:  # put the staging hosts right for the tests after this one
        subprocess.run(
            [
                "dpkg",
                f"--root={host.root}",
                f"--admindir={host.root}/var/lib/dpkg",
                "--force-script-chrootless",
                "--force-remove-reinstreq",
                "--purge",
                "kmp-broken",
            ],
            capture_output=True,
            check=True,
        )
    for deb in packages["main"].glob("kmp-broken_*"):
        deb.unlink()
    apt_repo.publish_repo(packages["main"], (), apt_repo.STACK_REPOS["main"])


def test_overdue_security_patch_appears_in_compliance_report(stack, packages, variant) -> None:
    from flows.compliance_audit import CompliancePolicy, compliance_audit
    from kmpops.connectors.notify import read_sink
    from kmpops.stack import apt_repo
    from tasks.common import records

    variant(lambda d: None)
    for host in stack.hosts:
        apt_repo.install_directly(Path(host.root), [packages["debs"][("kmp-zlib", "1.2-1")]])
    # the security repository's new Release is 30 days old: its update is past the 7-day SLA
    apt_repo.publish_repo(
        packages["security"],
        [packages["debs"][("kmp-zlib", "1.2-2")]],
        apt_repo.STACK_REPOS["security"],
        date=datetime.now(UTC) - timedelta(days=30),
    )
    sent = len(read_sink(stack.notifications))
    result = compliance_audit(CompliancePolicy(check_hosts=False))
    checks = {(c["check"], c["subject"]): c for c in result["checks"]}
    for host in stack.hosts:
        check = checks[("security patches within SLA", host.name)]
        assert not check["ok"]
        assert "kmp-zlib 1.2-2 pending 30" in check["evidence"]
        assert "(SLA 7 days)" in check["evidence"]
        assert check["severity"] == "critical"
    assert not result["passed"]
    assert any("security patches within SLA" in f for f in result["critical_failures"])
    # and the alert: the security_patch_sla rule fired for each host, notified on its route
    firing = [s for s in records().alert_states("security_patch_sla") if s.state == "firing"]
    for host in stack.hosts:
        assert any(f'host="{host.name}"' in s.labels_key for s in firing), host.name
    titles = [n.get("title", "") for n in read_sink(stack.notifications)[sent:]]
    assert any(t.startswith("[FIRING] security_patch_sla") and "kmp-zlib" in t for t in titles)


def test_the_machines_own_packages_are_untouched(packages, machine_before) -> None:
    assert machine_packages() == machine_before
