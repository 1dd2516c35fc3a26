"""The ``kmpops`` command: validate, stack, audit, approve, demo, serve.

Exit codes: 0 success, 1 a check failed (invalid config, broken audit chain), 2 usage errors.
Errors are one line each and never echo a secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from kmpops.config import load_config, summary
from kmpops.errors import ConfigError, KmpOpsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="The local stack (sshd fleet, S3, PostgreSQL…)")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail.")
app.add_typer(stack_app, name="stack")
app.add_typer(audit_app, name="audit")

DEFAULT_CONFIG = os.environ.get("KMPOPS_CONFIG", "ops.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="ops.yaml to use")]
RootOpt = Annotated[Path, typer.Option("--root", help="where the stack keeps its state")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


@app.command()
def validate(path: Annotated[Path, typer.Argument()] = Path(DEFAULT_CONFIG)) -> None:
    """Validate an ops.yaml: one summary line, or one line per problem naming the field."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            typer.echo(f"{path}: {problem}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{path}: valid — {summary(cfg)}")


@stack_app.command("up")
def stack_up(
    root: RootOpt = Path("var/stack"),
    port_base: Annotated[int, typer.Option(help="ports are port_base + offset")] = 17000,
    hosts: Annotated[int, typer.Option(help="production hosts")] = 4,
    staging_hosts: Annotated[int, typer.Option(help="staging hosts")] = 2,
    prefect_db: Annotated[str, typer.Option(help="sqlite or postgres")] = "sqlite",
    without: Annotated[list[str] | None, typer.Option(help="component to leave out")] = None,
) -> None:
    """Start the local stack (idempotent) and write <root>/ops.yaml."""
    from kmpops import stack

    if prefect_db not in ("sqlite", "postgres"):
        _fail(f"--prefect-db must be sqlite or postgres, not {prefect_db!r}", 2)
    unknown = sorted(set(without or []) - set(stack.COMPONENTS))
    if unknown:
        _fail(
            f"unknown stack components: {', '.join(unknown)} (known: {', '.join(stack.COMPONENTS)})"
        )
    components = tuple(c for c in stack.COMPONENTS if c not in set(without or []))
    try:
        info = stack.up(
            stack.StackSpec(
                root=root,
                port_base=port_base,
                production_hosts=hosts,
                staging_hosts=staging_hosts,
                prefect_db=prefect_db,  # type: ignore[arg-type]
                components=components,
            )
        )
    except KmpOpsError as err:
        _fail(f"stack up failed: {err}")
        return
    typer.echo(f"stack up in {info.started_s}s: {len(info.hosts)} hosts, config {info.ops_yaml}")
    if info.prefect:
        typer.echo(f"Prefect UI: {info.prefect['ui_url']}")


@stack_app.command("down")
def stack_down(root: RootOpt = Path("var/stack")) -> None:
    """Stop every process of the stack by its pid file."""
    from kmpops import stack

    stopped = stack.down(root)
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing'}")


@stack_app.command("status")
def stack_status(root: RootOpt = Path("var/stack")) -> None:
    """Show which processes of the stack are alive."""
    from kmpops import stack

    alive = stack.status(root)
    if not alive:
        typer.echo(f"no stack under {root}")
        raise typer.Exit(1)
    for name, up in alive.items():
        typer.echo(f"{'up  ' if up else 'DOWN'}  {name}")


def _records(config: Path):  # noqa: ANN202 - typer callback helper
    from kmpops.records import Records

    try:
        cfg = load_config(config)
    except ConfigError as err:
        _fail(f"{config}: {'; '.join(err.problems)}")
        raise
    return Records(cfg.records.url)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Verify the audit chain; exit 1 naming the first broken entry."""
    with _records(config) as rec:
        report = rec.verify_audit()
    if report.ok:
        typer.echo(f"audit chain intact: {report.events} events")
    else:
        _fail(f"audit chain BROKEN at {report.problem} ({report.events} events read)")


@audit_app.command("export")
def audit_export(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file (default stdout)")] = None,
) -> None:
    """Write the audit chain as JSON Lines."""
    with _records(config) as rec:
        lines = list(rec.export_audit())
    text = "".join(line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        typer.echo(f"wrote {len(lines)} events to {out}", err=True)


@app.command()
def approve(
    flow_run_id: Annotated[str, typer.Argument(help="the paused flow run")],
    approver: Annotated[str, typer.Option(help="your name in the token book")],
    decision: Annotated[
        str, typer.Option(help="approve, reject, or confirm (the requester, first)")
    ] = "approve",
    reason: Annotated[str, typer.Option(help="why")] = "",
    token_env: Annotated[
        str, typer.Option(help="environment variable holding the approver token")
    ] = "KMPOPS_APPROVER_TOKEN",  # noqa: S107 - the variable's name, not a token
    api_url: Annotated[str | None, typer.Option(help="Prefect API URL")] = None,
    request_code: Annotated[
        str | None,
        typer.Option(help="the request code you read in the form (default: the run's own)"),
    ] = None,
) -> None:
    """Answer a paused approval from the command line (the same form as the UI)."""
    from kmpops.approve import approve_run

    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        _fail("set PREFECT_API_URL or pass --api-url", 2)
        return
    if decision not in ("approve", "reject", "confirm"):
        _fail(f"--decision must be approve, reject or confirm, not {decision!r}", 2)
    try:
        approve_run(
            url,
            flow_run_id,
            decision=decision,
            approver=approver,
            reason=reason,
            token=os.environ.get(token_env, ""),
            request_code=request_code,
        )
    except KmpOpsError as err:
        _fail(f"approval not accepted: {err}")
    typer.echo(f"{decision} sent for flow run {flow_run_id} as {approver}")


def _repo_module(module: str, args: list[str]) -> None:
    root = Path.cwd()
    if not (root / "deployments").is_dir():
        _fail("run this from the kmp-ops repository root (deployments/ not found)", 2)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    raise typer.Exit(subprocess.call([sys.executable, "-m", module, *args], env=env))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(ctx: typer.Context) -> None:
    """Run the end-to-end demo (what `make demo` runs)."""
    _repo_module("deployments.demo", list(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Serve every flow as a deployment with its schedules and triggers."""
    _repo_module("deployments.serve", list(ctx.args))


@app.command()
def info(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Print the config's hosts per environment as JSON."""
    try:
        cfg = load_config(config)
    except ConfigError as err:
        _fail(f"{config}: {'; '.join(err.problems)}")
        return
    hosts = {env: [h.name for h in e.hosts] for env, e in cfg.environments.items()}
    typer.echo(json.dumps({"environments": hosts, "services": sorted(cfg.services)}, indent=2))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
