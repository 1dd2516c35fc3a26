"""Every wait has a bound: each Prefect task kmp-ops defines carries a timeout (issue 10).

The connectors' own bounds (commands, SFTP, locks, statements, HTTP) stop blocking I/O first;
the task timeout is the backstop that marks a step TimedOut so the flow's compensation runs.
"""

from __future__ import annotations

import importlib
import pkgutil

from prefect import Task

import tasks


def test_every_task_has_a_timeout() -> None:
    unbounded = []
    found = 0
    for mod in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{mod.name}")
        for name, value in vars(module).items():
            if isinstance(value, Task) and value.__module__ == module.__name__:
                found += 1
                if not value.timeout_seconds:
                    unbounded.append(f"tasks.{mod.name}.{name}")
    assert found > 30  # the check sees the tasks at all
    assert unbounded == []
