"""The ``kmpops`` command: validate, stack, audit, approve, locks, demo, serve.

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
    if cfg.records.audit_key is None:
        typer.echo(
            f"{path}: records.audit_key: not set — kmp-ops fails closed without it (no audit "
            "event is written, so every flow stops at its first step)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"{path}: valid — {summary(cfg)}")


@stack_app.command("up")
def stack_up(
    root: RootOpt = Path("var/stack"),
    port_base: Annotated[int, typer.Option(help="ports are port_base + offset")] = 17000,
    hosts: Annotated[int, typer.Option(help="production hosts")] = 4,
    staging_hosts: Annotated[int, typer.Option(help="staging hosts")] = 2,
    prefect_db: Annotated[str, typer.Option(help="sqlite or postgres")] = "sqlite",
    without: Annotated[list[str] | None, typer.Option(help="component to leave out")] = None,
    bastion: Annotated[
        bool, typer.Option(help="reach the hosts through a bastion sshd (port_base + 250)")
    ] = False,
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
                bastion=bastion,
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
    return Records.from_config(cfg)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Verify the audit chain against the audit key and the checkpoints.

    Prints one line per problem (truncation, rewrite, deletion, checkpoint, key), each naming
    the first event concerned, and exits 1 on any; exits 0 with a summary when the chain holds.
    """
    try:
        with _records(config) as rec:
            report = rec.verify_audit()
    except KmpOpsError as err:
        _fail(f"audit chain NOT verified: {err}")
        return
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    if report.ok:
        typer.echo(
            f"audit chain intact: {report.events} events, "
            f"{report.checkpoints} checkpoint(s) matched"
        )
        return
    for problem in report.problems:
        typer.echo(f"audit chain BROKEN at {problem}", err=True)
    _fail(
        f"{len(report.problems)} problem(s); first: {report.problem} "
        f"({report.events} events read, {report.checkpoints} checkpoint(s))"
    )


@audit_app.command("export")
def audit_export(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file (default stdout)")] = None,
) -> None:
    """Write the audit chain as JSON Lines: every event, then every checkpoint."""
    try:
        with _records(config) as rec:
            lines = list(rec.export_audit())
    except KmpOpsError as err:
        _fail(f"audit export failed: {err}")
        return
    text = "".join(line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        checkpoints = sum(1 for line in lines if line.startswith('{"type":"checkpoint"'))
        typer.echo(
            f"wrote {len(lines) - checkpoints} events and {checkpoints} checkpoints to {out}",
            err=True,
        )


@audit_app.command("checkpoint")
def audit_checkpoint(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    reason: Annotated[str, typer.Option(help="why (kept in the checkpoint)")] = "cli",
) -> None:
    """Verify the chain and anchor its head in the write-once checkpoint store."""
    try:
        with _records(config) as rec:
            checkpoint, where = rec.checkpoint_audit(reason)
    except KmpOpsError as err:
        _fail(f"audit chain not anchored: {err}")
        return
    typer.echo(f"checkpoint of seq {checkpoint.seq} written to {where}")


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


@app.command()
def ack(
    flow_run_id: Annotated[str, typer.Argument(help="the paused incident-escalation run")],
    responder: Annotated[str, typer.Option(help="your name in the responder token book")],
    note: Annotated[str, typer.Option(help="anything the next responder should know")] = "",
    token_env: Annotated[
        str, typer.Option(help="environment variable holding your responder token")
    ] = "KMPOPS_RESPONDER_TOKEN",  # noqa: S107 - the variable's name, not a token
    api_url: Annotated[str | None, typer.Option(help="Prefect API URL")] = None,
) -> None:
    """Acknowledge an incident page from the command line (the same form as the UI)."""
    from kmpops.approve import ack_run

    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        _fail("set PREFECT_API_URL or pass --api-url", 2)
        return
    try:
        ack_run(
            url, flow_run_id, responder=responder, token=os.environ.get(token_env, ""), note=note
        )
    except KmpOpsError as err:
        _fail(f"acknowledgement not sent: {err}")
    typer.echo(f"acknowledgement sent for flow run {flow_run_id} as {responder}")


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


inventory_app = typer.Typer(no_args_is_help=True, help="Ansible inventories as hosts.")
app.add_typer(inventory_app, name="inventory")


@inventory_app.command("import")
def inventory_import(
    inventory: Annotated[Path, typer.Argument(help="an Ansible inventory file (INI or YAML)")],
    format: Annotated[
        str | None, typer.Option("--format", help="ini or yaml (default: from the file)")
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(help="GROUP or GROUP=ENVIRONMENT to import (default: every top group)"),
    ] = None,
    known_hosts: Annotated[Path, typer.Option(help="known_hosts for the imported hosts")] = Path(
        "~/.ssh/known_hosts"
    ),
    key_file: Annotated[
        Path | None, typer.Option(help="key for hosts without ansible_ssh_private_key_file")
    ] = None,
    agent: Annotated[bool, typer.Option(help="offer the ssh-agent's keys too")] = False,
) -> None:
    """Print ops.yaml environments built from an Ansible inventory (stdout, YAML) and what was
    mapped and what was not (stderr). An unknown or unsafe value is an error naming its line;
    nothing is printed on stdout then."""
    import yaml

    from kmpops.config import parse_config
    from kmpops.inventory import InventoryError, load_inventory, map_environments

    if format not in (None, "ini", "yaml"):
        _fail(f"--format must be ini or yaml, not {format!r}", 2)
    chosen: dict[str, str] | None = None
    if group:
        chosen = {}
        for item in group:
            name, _, env = item.partition("=")
            chosen[name] = env or name
    defaults: dict[str, object] = {"known_hosts": str(known_hosts.expanduser().absolute())}
    if key_file is not None:
        defaults["key_file"] = str(key_file.expanduser().absolute())
    if agent:
        defaults["agent"] = True
    try:
        parsed = load_inventory(inventory, format)  # type: ignore[arg-type]
        mapped = map_environments(parsed, chosen, defaults=defaults, base=inventory.parent)
    except InventoryError as err:
        _fail(str(err))
        return
    document = {"environments": {env.name: {"hosts": env.hosts} for env in mapped}}
    try:
        parse_config(document, source=str(inventory))
    except ConfigError as err:
        import re

        by_env = {env.name: env for env in mapped}
        for problem in err.problems:
            match = re.match(r"environments\.([^.]+)\.hosts\[(\d+)\]", problem)
            where = ""
            if match and match.group(1) in by_env:
                name = by_env[match.group(1)].hosts[int(match.group(2))]["name"]
                where = f" (host {name}, {inventory}:{parsed.hosts[name].line})"
            typer.echo(f"{inventory}: {problem}{where}", err=True)
        if any("give key_file" in p for p in err.problems):
            typer.echo("hint: --key-file PATH or --agent for hosts without a key", err=True)
        raise typer.Exit(1) from None
    for env in mapped:
        typer.echo(f"{env.name}: {len(env.hosts)} hosts from group {env.group}", err=True)
        for host in env.hosts:
            fields = ", ".join(
                f"{k}={v}" for k, v in host.items() if k not in ("name", "vars", "jump")
            )
            hops = f", jump via {len(host['jump'])} hop(s)" if host.get("jump") else ""
            typer.echo(f"  mapped {host['name']}: {fields}{hops}", err=True)
        for item in env.not_mapped:
            typer.echo(
                f"  not mapped {item.where}: {item.key} ({item.host}): {item.reason}", err=True
            )
    from kmpops.inventory import unimported_hosts

    for item in unimported_hosts(parsed, mapped):
        typer.echo(f"not imported: {item}: in none of the imported groups", err=True)
    typer.echo(yaml.safe_dump(document, sort_keys=False), nl=False)


@app.command("locks")
def locks_list(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    all_targets: Annotated[
        bool, typer.Option("--all", help="also free targets (their last fencing number)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per lease")] = False,
) -> None:
    """List target locks: holder run, target, since, expiry, fencing number, state."""
    from datetime import UTC, datetime

    with _records(config) as rec:
        rec.migrate()
        leases = rec.leases(include_free=all_targets)
    now = datetime.now(UTC)

    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"

    def state(expires: datetime | None, holder: str | None) -> str:
        if holder is None:
            return "free"
        return "held" if expires is not None and expires > now else "EXPIRED"

    rows = [
        {
            "target": v.target,
            "state": state(v.expires_at, v.holder),
            "holder_run": v.holder or "-",
            "holder_name": v.holder_name or "-",
            "since": when(v.acquired_at if v.holder else None),
            "expires": when(v.expires_at),
            "fence": v.fence,
        }
        for v in leases
    ]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no locks held")
        return
    cols = ["target", "state", "holder_name", "holder_run", "since", "expires", "fence"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for row in rows:
        typer.echo("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()


@app.command("sudoers")
def sudoers(
    environment: Annotated[str, typer.Argument(help="the environment whose hosts need the rules")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    login_user: Annotated[
        str | None, typer.Option(help="the deploy user, if not the hosts' user in ops.yaml")
    ] = None,
    check: Annotated[bool, typer.Option(help="validate the text with visudo -cf")] = True,
) -> None:
    """Print the sudo rules the environment's hosts need: one line per host and become command
    (the service's restart by default), exact arguments, NOPASSWD, nothing else.

    Install on each host with ``visudo -cf FILE && install -m 0440 FILE /etc/sudoers.d/kmpops``.
    Exits 1 naming the problem for an unknown environment, a command sudoers cannot express
    exactly, or (``--check``, when visudo is installed here) text visudo refuses.
    """
    import shutil
    import subprocess
    import tempfile

    from kmpops.become import sudoers_rules

    try:
        cfg = load_config(config)
        text = sudoers_rules(cfg, environment, login_user=login_user)
    except ConfigError as err:
        _fail(f"{config}: {'; '.join(err.problems)}")
        return
    except (KeyError, KmpOpsError) as err:
        _fail(f"sudoers {environment}: {err.args[0] if err.args else err}")
        return
    if check and shutil.which("visudo"):
        with tempfile.NamedTemporaryFile("w", suffix=".sudoers") as fh:
            fh.write(text)
            fh.flush()
            done = subprocess.run(
                ["visudo", "-cf", fh.name], capture_output=True, text=True, timeout=30, check=False
            )
        if done.returncode != 0:
            _fail(f"visudo refused the rules: {(done.stdout + done.stderr).strip()}")
    typer.echo(text, nl=False)
