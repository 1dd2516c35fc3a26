"""``cost-report``: what each host costs per month, per cost center, against a budget.

Resources are measured as for ``capacity-report`` (CPUs, memory, filesystem size per host over
SSH); cost = resources times the unit prices of the :class:`UnitPrices` parameter (a model, not a
secret). The idle share of each cost is the optimisation opportunity; the report names the
most idle hosts. Read-only; the totals go to the audit chain.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.capacity_report import collect_usage
from kmpops.plans.capacity import UnitPrices, cost_rows
from tasks.common import audit, ops_config
from tasks.reports import markdown_table, publish_report


class CostRequest(BaseModel):
    """Prices and budget."""

    environment: str | None = Field(default=None, description="default: every environment")
    prices: UnitPrices = Field(default_factory=UnitPrices)
    monthly_budget: float | None = Field(default=None, ge=0, description="in prices.currency")


@flow(name="cost-report", task_runner=ThreadPoolTaskRunner(max_workers=16))
def cost_report(request: CostRequest | None = None) -> dict[str, Any]:
    """Monthly cost per host and cost center, idle cost, budget status."""
    req = request or CostRequest()
    cfg = ops_config()
    usage, failed = collect_usage(req.environment)
    env_of = {h.name: env for env, e in cfg.environments.items() for h in e.hosts}
    rows, totals = cost_rows([(env_of[n], u) for n, u in usage.items()], req.prices)
    cur = req.prices.currency
    total = round(sum(totals.values()), 2)
    idle = round(sum(float(r[f"idle_{cur}"]) for r in rows), 2)  # type: ignore[arg-type]
    over = req.monthly_budget is not None and total > req.monthly_budget
    most_idle = sorted(rows, key=lambda r: -float(r[f"idle_{cur}"]))[:3]  # type: ignore[arg-type]
    lines = [
        "# Cost report",
        "",
        f"Total: **{total:.2f} {cur}/month** on {len(rows)} hosts"
        + (f" ({len(failed)} unreachable, not counted)" if failed else "")
        + ".",
    ]
    if req.monthly_budget is not None:
        state = "OVER" if over else "within"
        lines.append(f"Budget {req.monthly_budget:.2f} {cur}: {state} budget.")
    lines += [
        f"Idle share (unused CPU, memory, disk): {idle:.2f} {cur}/month.",
        "",
        "## Per cost center",
        "",
        markdown_table([{"cost_center": k, f"monthly_{cur}": v} for k, v in totals.items()]),
        "",
        "## Recommendations",
        "",
    ]
    lines += [
        f"- {r['host']}: {r[f'idle_{cur}']} {cur}/month idle — consider downsizing"
        for r in most_idle
        if float(r[f"idle_{cur}"]) > 0  # type: ignore[arg-type]
    ] or ["- none"]
    lines += ["", "## Per host", "", markdown_table(rows)]
    publish_report("cost-report", "\n".join(lines) + "\n", rows, description="monthly cost")
    audit(
        "cost.report",
        req.environment or "all",
        total=total,
        currency=cur,
        per_cost_center=totals,
        over_budget=over,
    )
    return {"rows": rows, "totals": totals, "total": total, "idle": idle, "over_budget": over}
