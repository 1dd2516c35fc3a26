"""A secret logged on purpose inside a flow run never reaches the Prefect API's stored logs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from tasks.common import secret

SECRET_VALUE = "kmp-S3cret-Value-7f3a9c"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@task
def leak_on_purpose(ref: str) -> str:
    value = secret(ref)
    logger = get_run_logger()
    logger.info("resolved secret is %s", value)
    logger.info(f"inline f-string leak: {value}")
    logger.warning("aws_secret_access_key=%s", AWS_SECRET)
    logger.info("dsn postgresql://app:%s@127.0.0.1/app", value)
    return "done"


@flow(name="redaction-probe")
def redaction_probe(ref: str) -> str:
    get_run_logger().info("flow-level leak %s", secret(ref))
    return leak_on_purpose(ref)


async def _logs(flow_run_id: UUID) -> list[str]:
    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def test_secret_never_reaches_prefect_api_logs(stack: object, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET_VALUE)
    state = redaction_probe(f"file:{secret_file}", return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    messages: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the API log handler ships in batches
        messages = asyncio.run(_logs(flow_run_id))
        if sum("leak" in m or "secret" in m for m in messages) >= 4:
            break
        time.sleep(0.5)
    text = "\n".join(messages)
    assert "flow-level leak" in text and "inline f-string leak" in text
    assert SECRET_VALUE not in text
    assert AWS_SECRET not in text
    assert "***" in text


@flow(name="redaction-error-probe")
def redaction_error_probe(ref: str) -> None:
    from kmpops.errors import CommandFailed

    value = secret(ref)
    raise CommandFailed(f"restore failed: psql postgresql://app:{value}@127.0.0.1/app refused")


def test_secret_in_an_error_never_reaches_the_run_state(stack: object, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET_VALUE + "-err")
    state = redaction_error_probe(f"file:{secret_file}", return_state=True)
    assert state.is_failed()

    async def stored_message() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
        return run.state.message or ""

    message = asyncio.run(stored_message())
    assert "restore failed: psql postgresql://app:***@127.0.0.1/app refused" in message
    assert SECRET_VALUE not in message
