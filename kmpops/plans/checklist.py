"""The pre-deployment checklist: the guide's six gates as pluggable checks with evidence.

Gates (in the guide's order): code review completed, tests passed, security scan completed,
dependencies updated, documentation updated, rollback plan prepared. Each gate has one or more
checks; the gate passes when all its checks pass. A check only *reads* facts through a
:class:`ChecklistFacts` port (command runner, HTTP, evidence records in the object store, the
artifact's checksum, the release currently on each target host), so the checklist is tested as
tables of facts, and the tasks layer supplies the real ports.

Default evidence (``default_checklist``): for the first five gates a JSON record in the object
store at ``evidence/<service>/<version>/<gate>.json`` (written by CI: reviewer, pipeline URL,
scanner report...); a record naming a ``sha256`` must name the artifact being deployed. Security
scan also checks the artifact: present in storage, checksum matching its recorded sha256.
Rollback plan: every target host has a current release to go back to, or first installs are
explicitly allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "GATES",
    "ArtifactCheck",
    "ChecklistFacts",
    "ChecklistReport",
    "CommandCheck",
    "GateResult",
    "HttpCheck",
    "RecordCheck",
    "RollbackPlanCheck",
    "default_checklist",
    "evaluate_checklist",
]

GATES: tuple[str, ...] = (
    "code_review",
    "tests_passed",
    "security_scan",
    "dependencies_updated",
    "documentation_updated",
    "rollback_plan",
)


class ChecklistFacts(Protocol):
    """What checks may read. Implemented by the tasks layer over real connectors."""

    service: str
    version: str
    artifact_sha256: str | None  # sha256 of the artifact as found (None: not found)
    expected_sha256: str | None  # sha256 recorded next to the artifact (None: none recorded)
    current_releases: Mapping[str, str | None]  # target host -> current release (None: none)

    def run_command(self, command: str) -> tuple[int, str]: ...
    def http_status(self, url: str) -> int | None: ...
    def evidence_record(self, key: str) -> dict[str, Any] | None: ...


class Check(Protocol):
    """One pluggable check: a label and ``run(facts) -> (passed, evidence)``."""

    label: str

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class CommandCheck:
    """Passes when a (configured, trusted) command exits 0; evidence is its last output line."""

    command: str
    label: str = "command"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """Run the command through the facts port."""
        code, output = facts.run_command(self.command)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        return code == 0, f"exit {code}" + (f": {last[:200]}" if last else "")


@dataclass(frozen=True)
class HttpCheck:
    """Passes when GET ``url`` answers ``expect_status``."""

    url: str
    expect_status: int = 200
    label: str = "http"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """GET the URL through the facts port."""
        status = facts.http_status(self.url)
        return status == self.expect_status, f"GET {self.url} -> {status or 'no answer'}"


@dataclass(frozen=True)
class RecordCheck:
    """Passes when an evidence record exists in the store (and names this artifact, if it
    names one). ``key`` may use ``{service}``, ``{version}`` and ``{gate}``."""

    key: str
    gate: str = ""
    label: str = "record"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """Look the record up through the facts port."""
        key = self.key.format(service=facts.service, version=facts.version, gate=self.gate)
        record = facts.evidence_record(key)
        if record is None:
            return False, f"no evidence record {key}"
        named = record.get("sha256")
        if named and facts.artifact_sha256 and named != facts.artifact_sha256:
            return False, f"{key} is evidence for another artifact (sha256 {named[:12]}…)"
        detail = ", ".join(f"{k}={v}" for k, v in sorted(record.items()) if k != "sha256")
        return True, f"{key}" + (f": {detail[:200]}" if detail else "")


@dataclass(frozen=True)
class ArtifactCheck:
    """Passes when the artifact exists and its sha256 equals the recorded one."""

    label: str = "artifact"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """Compare the artifact's checksum with the recorded checksum."""
        if facts.artifact_sha256 is None:
            return False, "artifact not found in storage"
        if facts.expected_sha256 is None:
            return False, f"no recorded checksum (artifact sha256 {facts.artifact_sha256[:12]}…)"
        if facts.expected_sha256 != facts.artifact_sha256:
            return False, "artifact checksum does not match the recorded sha256"
        return True, f"sha256 {facts.artifact_sha256[:12]}… matches"


@dataclass(frozen=True)
class RollbackPlanCheck:
    """Passes when every target host has a release to go back to (or first installs are
    explicitly allowed)."""

    allow_first_install: bool = False
    label: str = "rollback plan"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """Inspect the current release of every target host."""
        missing = sorted(h for h, v in facts.current_releases.items() if not v)
        if not facts.current_releases:
            return False, "no target hosts"
        if not missing:
            return True, f"previous release on all {len(facts.current_releases)} hosts"
        if self.allow_first_install:
            return True, f"first install allowed on {', '.join(missing)}"
        return False, f"no previous release on {', '.join(missing)} (first install not allowed)"


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate, with the evidence of each of its checks."""

    gate: str
    passed: bool
    evidence: str


@dataclass(frozen=True)
class ChecklistReport:
    """All gate results; ``passed`` only if every gate passed."""

    results: tuple[GateResult, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """True if every gate passed."""
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[str]:
        """Names of the gates that failed."""
        return [r.gate for r in self.results if not r.passed]

    def table(self) -> list[dict[str, str]]:
        """Rows for a table artifact."""
        return [
            {"gate": r.gate, "result": "pass" if r.passed else "FAIL", "evidence": r.evidence}
            for r in self.results
        ]


def default_checklist(*, allow_first_install: bool = False) -> dict[str, list[Check]]:
    """The default checks of each gate (see the module docstring)."""
    key = "evidence/{service}/{version}/{gate}.json"
    checks: dict[str, list[Check]] = {g: [RecordCheck(key, gate=g)] for g in GATES[:5]}
    checks["security_scan"].append(ArtifactCheck())
    checks["rollback_plan"] = [RollbackPlanCheck(allow_first_install=allow_first_install)]
    return checks


def evaluate_checklist(
    checks: Mapping[str, Sequence[Check]],
    facts: ChecklistFacts,
    *,
    on_gate: Callable[[GateResult], None] | None = None,
) -> ChecklistReport:
    """Run every gate's checks (all gates, even after a failure, for a complete report).

    A check that raises fails its gate with the exception's message as evidence. Gates missing
    from ``checks`` fail ("no check configured"): all six gates are mandatory.
    """
    results: list[GateResult] = []
    for gate in GATES:
        gate_checks = list(checks.get(gate, ()))
        if not gate_checks:
            result = GateResult(gate, False, "no check configured")
        else:
            passed, notes = True, []
            for check in gate_checks:
                try:
                    ok, evidence = check.run(facts)
                except Exception as exc:  # a broken check fails its gate, never the checklist
                    ok, evidence = False, f"check error: {type(exc).__name__}: {exc}"
                passed = passed and ok
                notes.append(f"{check.label}: {evidence}")
            result = GateResult(gate, passed, "; ".join(notes))
        results.append(result)
        if on_gate:
            on_gate(result)
    return ChecklistReport(tuple(results))
