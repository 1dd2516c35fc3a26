"""deploy-recover: put back the hosts of a deploy-pipeline run whose process died.

deploy-pipeline rolls back in-process on any error; a process that is killed (OOM, SIGKILL, its
machine lost) cannot. Its audit trail can: the run announces each batch (``deploy.activating``,
hosts and the release each had) before it switches anything. This flow reads that trail for the
crashed run (``kmpops.plans.recovery``) and rolls every announced host that was not rolled back
already onto its previous release (switch back, restart, health check, record), like the
pipeline's own compensation. Served, it starts by itself when a deploy-pipeline run turns
Crashed (the runner saw its process die); operators can run it for a run that is still shown
Running with ``force=True``, which first marks that run Crashed.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.change_request import close_after_deploy_recovery
from kmpops.errors import KmpOpsError, PolicyViolation
from kmpops.plans.recovery import plan_recovery
from tasks.common import audit, notify, records, run_id
from tasks.context import in_run_context
from tasks.deploy import mark_run_crashed, read_flow_run, roll_back_hosts
from tasks.locks import RunLocks, recovery_targets, release_dead_run_locks

PREFIX = "prefect.flow-run."


class RecoveryFailed(KmpOpsError):
    """Some hosts could not be put back (each is flagged and a critical notification sent)."""


def _run_uuid(flow_run_id: str) -> str:
    text = flow_run_id.strip().removeprefix(PREFIX)
    try:
        return str(UUID(text))
    except ValueError:
        raise ValueError(f"flow_run_id: {flow_run_id!r} is not a flow run id") from None


def _already_recovered(crashed: str) -> bool:
    return any(
        (e.details or {}).get("crashed_run") == crashed
        for e in records().audit_events(action="deploy.recovered")
    )


@flow(
    name="deploy-recover",
    task_runner=ThreadPoolTaskRunner(max_workers=32),
    flow_run_name="recover-deploy-{flow_run_id}",
)
@in_run_context
def deploy_recover(flow_run_id: str, force: bool = False) -> dict[str, Any]:
    """Roll back what the crashed deploy-pipeline run ``flow_run_id`` left switched.

    Raises ValueError for a malformed id, NotFound for an unknown run, PolicyViolation (nothing
    changed) for a run of another flow or one still in progress without ``force``,
    RecoveryFailed naming the hosts that could not be put back. Idempotent: a run already
    recovered, or one that finished on its own, is left alone.
    """
    logger = get_run_logger()
    crashed = _run_uuid(flow_run_id)
    info = read_flow_run(crashed)
    if info["flow"] != "deploy-pipeline":
        raise PolicyViolation(f"flow run {crashed} is a {info['flow']!r} run, not deploy-pipeline")
    if not info["final"]:
        if not force:
            raise PolicyViolation(
                f"flow run {crashed} ({info['name']}) is {info['state_name']}: if its process "
                "is gone, run again with force=True to mark it Crashed and recover it"
            )
        mark_run_crashed(crashed, f"marked Crashed by deploy-recover run {run_id()}")
    subject = f"flow-run/{crashed}"
    if _already_recovered(crashed):
        return {"status": "already recovered", "run": crashed}
    events = records().audit_events(run_id=crashed)
    plan = plan_recovery([(e.action, e.subject, e.details or {}) for e in events])
    if plan.finished:
        release_dead_run_locks(crashed, f"run ended with {plan.finished}")
        logger.info("run %s ended with %s: nothing to recover", crashed, plan.finished)
        return {"status": "nothing to recover", "run": crashed, "finished": plan.finished}
    if not plan.hosts or plan.service is None:
        release_dead_run_locks(crashed, "crashed before switching any host")
        audit("deploy.recovered", subject, crashed_run=crashed, hosts=[], rollback_failed=[])
        close_after_deploy_recovery(_change_requests_of(events))
        return {"status": "nothing switched", "run": crashed}

    version = plan.version or "unknown"
    # Take the crashed run's leases on what it switched (new fences), free the rest it held.
    with RunLocks(recovery_targets(plan.service, plan.hosts), take_from=crashed):
        release_dead_run_locks(crashed, f"recovered by deploy-recover run {run_id()}")
        done, failed = roll_back_hosts(plan.service, version, plan.hosts, flag_run_id=crashed)
    audit(
        "deploy.recovered",
        subject,
        crashed_run=crashed,
        service=plan.service,
        version=version,
        hosts=done,
        rollback_failed=failed,
    )
    if failed:
        notify(
            "critical",
            f"RECOVERY FAILED: {plan.service} {version} on {len(failed)} host(s)",
            f"The deploy run {crashed} crashed; these hosts could not be put back on their "
            "previous release and need a human:\n" + "\n".join(failed),
        )
        raise RecoveryFailed(f"recovery of run {crashed} failed on: {'; '.join(failed)}")
    notify(
        "warning",
        f"Recovered crashed deploy of {plan.service} {version}",
        f"Run {crashed} crashed; {len(done)} host(s) put back:\n" + "\n".join(done),
    )
    changes = close_after_deploy_recovery(_change_requests_of(events))
    return {"status": "recovered", "run": crashed, "hosts": done, "change_requests": changes}


def _change_requests_of(events: list[Any]) -> list[int]:
    """The change requests the crashed deploy was started for (its ``deploy.requested``)."""
    ids = []
    for event in events:
        if event.action != "deploy.requested":
            continue
        cr = (event.details or {}).get("change_request_id")
        if isinstance(cr, int):
            ids.append(cr)
    return ids
