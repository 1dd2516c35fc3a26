"""The pre-deployment checklist: the guide's six gates (and the release's status) as pluggable
checks with evidence.

Gates (in the guide's order): code review completed, tests passed, security scan completed,
dependencies updated, documentation updated, rollback plan prepared. Each gate has one or more
checks; the gate passes when all its checks pass. A check only *reads* facts through a
:class:`ChecklistFacts` port (command runner, HTTP, evidence records in the object store, the
artifact's checksum, the release currently on each target host), so the checklist is tested as
tables of facts, and the tasks layer supplies the real ports.

Default evidence (``default_checklist``): for the first five gates a JSON object in the object
store at ``evidence/<service>/<version>/<gate>.json`` (written by CI), read and checked against
the gate's schema, bound to the artifact by its ``sha256`` (required):

- code_review: ``author`` and ``approved_by`` (a list) naming someone other than the author;
- tests_passed: ``passed`` >= the policy's ``min_tests`` and ``failed`` = 0 (integers);
- security_scan: ``scanner`` and ``findings`` by severity, each under the policy's maximum;
  also the artifact itself: present in storage, checksum matching its recorded sha256;
- dependencies_updated: ``vulnerable`` = 0 and ``outdated`` <= the policy's maximum (counts,
  or lists of packages);
- documentation_updated: ``changelog`` with ``version`` (this version) and a non-empty ``entry``.

A record that is not JSON, a missing field, a wrong type, an over-limit count or a sha256 of
another artifact fails its gate, with the reason as the gate's evidence. Rollback plan: every
target host has a current release to go back to, or first installs are explicitly allowed.
Release not marked bad: no incident marked this version bad (``release.marked_bad``), unless an
emergency override is asked for (the deploy then needs one more approver).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "GATES",
    "ArtifactCheck",
    "ChecklistFacts",
    "ChecklistReport",
    "CommandCheck",
    "EvidenceCheck",
    "EvidenceLimits",
    "EvidenceUnreadable",
    "GateResult",
    "HttpCheck",
    "NotMarkedBadCheck",
    "RollbackPlanCheck",
    "default_checklist",
    "evaluate_checklist",
    "marked_bad_marks",
    "release_refusal",
]

GATES: tuple[str, ...] = (
    "code_review",
    "tests_passed",
    "security_scan",
    "dependencies_updated",
    "documentation_updated",
    "rollback_plan",
    "release_not_marked_bad",
)


class ChecklistFacts(Protocol):
    """What checks may read. Implemented by the tasks layer over real connectors."""

    service: str
    version: str
    artifact_sha256: str | None  # sha256 of the artifact as found (None: not found)
    expected_sha256: str | None  # sha256 recorded next to the artifact (None: none recorded)
    current_releases: Mapping[str, str | None]  # target host -> current release (None: none)

    marked_bad: Sequence[str]  # why this release is marked bad (empty: it is not)
    emergency: bool  # an emergency override was asked for

    def run_command(self, command: str) -> tuple[int, str]: ...
    def http_status(self, url: str) -> int | None: ...
    def evidence_record(self, key: str) -> Any:
        """The parsed JSON record at ``key`` (None: no record); raises EvidenceUnreadable."""
        ...


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


class EvidenceUnreadable(Exception):
    """An evidence record exists but cannot be read as JSON (the message says why)."""


@dataclass(frozen=True)
class EvidenceLimits:
    """What the evidence must show (from the service's ``evidence`` policy in ops.yaml)."""

    min_tests: int = 1
    max_findings: Mapping[str, int] = field(default_factory=lambda: {"critical": 0, "high": 0})
    max_outdated: int = 0


def _field(record: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``record[name]`` if present with the right JSON type; raises _Bad naming the problem.
    A bool is never an int here (``"failed": true`` is not a count)."""
    if name not in record:
        raise _Bad(f"missing field {name!r}")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise _Bad(f"field {name!r} must be {_type_name(kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise _Bad(f"field {name!r} must be {_type_name(kinds)}, not {type(value).__name__}")
    return value


def _type_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _count(record: Mapping[str, Any], name: str) -> int:
    """A non-negative integer field, or a list whose length is the count."""
    value = _field(record, name, (int, list))
    count = len(value) if isinstance(value, list) else value
    if count < 0:
        raise _Bad(f"field {name!r} must not be negative")
    return count


class _Bad(Exception):
    pass


def _code_review(record: Mapping[str, Any], facts: ChecklistFacts, limits: EvidenceLimits) -> str:
    author = _field(record, "author", str).strip()
    approvers = _field(record, "approved_by", list)
    if not all(isinstance(a, str) for a in approvers):
        raise _Bad("field 'approved_by' must be a list of names")
    others = sorted({a.strip() for a in approvers if a.strip() and a.strip() != author})
    if not author:
        raise _Bad("field 'author' is empty")
    if not others:
        raise _Bad(f"not approved by anyone other than the author {author!r}")
    return f"author {author}, approved by {', '.join(others)}"


def _tests_passed(record: Mapping[str, Any], facts: ChecklistFacts, limits: EvidenceLimits) -> str:
    passed, failed = _count(record, "passed"), _count(record, "failed")
    if failed:
        raise _Bad(f"{failed} test(s) failed")
    if passed < limits.min_tests:
        raise _Bad(f"only {passed} test(s) ran (at least {limits.min_tests} required)")
    return f"{passed} passed, 0 failed"


def _security_scan(record: Mapping[str, Any], facts: ChecklistFacts, limits: EvidenceLimits) -> str:
    scanner = _field(record, "scanner", str)
    findings = _field(record, "findings", dict)
    counts = {}
    for severity, limit in sorted(limits.max_findings.items()):
        counts[severity] = _count(findings, severity)
        if counts[severity] > limit:
            raise _Bad(
                f"{counts[severity]} {severity} finding(s) (at most {limit} allowed) by {scanner}"
            )
    return f"{scanner}: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def _dependencies(record: Mapping[str, Any], facts: ChecklistFacts, limits: EvidenceLimits) -> str:
    vulnerable, outdated = _count(record, "vulnerable"), _count(record, "outdated")
    if vulnerable:
        raise _Bad(f"{vulnerable} known-vulnerable package(s)")
    if outdated > limits.max_outdated:
        raise _Bad(f"{outdated} outdated package(s) (at most {limits.max_outdated} allowed)")
    return f"0 vulnerable, {outdated} outdated"


def _documentation(record: Mapping[str, Any], facts: ChecklistFacts, limits: EvidenceLimits) -> str:
    changelog = _field(record, "changelog", dict)
    version = _field(changelog, "version", str)
    entry = _field(changelog, "entry", str)
    if version != facts.version:
        raise _Bad(f"changelog entry is for version {version!r}, not {facts.version!r}")
    if not entry.strip():
        raise _Bad("changelog entry is empty")
    return f"changelog {version}: {entry.strip()[:80]}"


Schema = Callable[[Mapping[str, Any], "ChecklistFacts", EvidenceLimits], str]

SCHEMAS: dict[str, Schema] = {
    "code_review": _code_review,
    "tests_passed": _tests_passed,
    "security_scan": _security_scan,
    "dependencies_updated": _dependencies,
    "documentation_updated": _documentation,
}
"""Each evidence gate's schema: reads the record, raises _Bad with the reason, returns the
evidence line. Every record also names the artifact's ``sha256``."""


@dataclass(frozen=True)
class EvidenceCheck:
    """Passes when the gate's evidence record exists, is a JSON object, names this artifact's
    sha256 and meets the gate's schema (:data:`SCHEMAS`) under ``limits``. ``key`` may use
    ``{service}``, ``{version}`` and ``{gate}``. A missing field, a wrong type, an over-limit
    count or a sha256 of another artifact fails the gate with the reason."""

    key: str
    gate: str
    limits: EvidenceLimits = field(default_factory=EvidenceLimits)
    label: str = "evidence"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """Read the record through the facts port and check it."""
        key = self.key.format(service=facts.service, version=facts.version, gate=self.gate)
        try:
            record = facts.evidence_record(key)
        except EvidenceUnreadable as exc:
            return False, f"{key}: {exc}"
        if record is None:
            return False, f"no evidence record {key}"
        if not isinstance(record, dict):
            return False, f"{key}: not a JSON object ({type(record).__name__})"
        try:
            named = _field(record, "sha256", str)
            if facts.artifact_sha256 is None:
                raise _Bad("the artifact's own sha256 is not known")
            if named != facts.artifact_sha256:
                raise _Bad(f"evidence for another artifact (sha256 {named[:12]}…)")
            detail = SCHEMAS[self.gate](record, facts, self.limits)
        except _Bad as bad:
            return False, f"{key}: {bad}"
        return True, f"{key}: {detail}"


@dataclass(frozen=True)
class NotMarkedBadCheck:
    """Passes when no incident marked this release bad — or, when one did, under an emergency
    override (which needs one more approver: :attr:`ChecklistReport.overrides`)."""

    label: str = "release status"

    def run(self, facts: ChecklistFacts) -> tuple[bool, str]:
        """Read the marks through the facts port."""
        marks = list(facts.marked_bad)
        if not marks:
            return True, f"{facts.service} {facts.version} is not marked bad"
        text = f"{facts.service} {facts.version} was marked bad: {'; '.join(marks)[:300]}"
        if facts.emergency:
            return True, f"{text}; EMERGENCY OVERRIDE (one more approver required)"
        return False, f"{text} (refused; an emergency override with one more approver can)"


def marked_bad_marks(
    events: Iterable[tuple[str, Mapping[str, Any]]], *, service: str, version: str
) -> list[str]:
    """The ``release.marked_bad`` audit events (subject, details) that mark ``version`` of
    ``service`` bad, each as one line (where, which incident)."""
    marks = []
    for subject, details in events:
        if not subject.startswith(f"{service}/") or details.get("version") != version:
            continue
        where = subject.split("/", 1)[1]
        incident = details.get("incident")
        marks.append(f"{where}" + (f" by incident #{incident}" if incident is not None else ""))
    return marks


def release_refusal(marks: Sequence[str], *, service: str, version: str, emergency: bool) -> str:
    """Why a release marked bad may not be deployed ("" when it may: no marks, or an emergency
    override, which the deploy pipeline pairs with one more approver)."""
    if not marks or emergency:
        return ""
    return (
        f"{service} {version} was marked bad ({'; '.join(marks)[:300]}); "
        "only an emergency override with one more approver can deploy it"
    )


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
    overrides: tuple[str, ...] = ()  # emergency overrides in effect (each: one more approver)

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


def default_checklist(
    *, allow_first_install: bool = False, limits: EvidenceLimits | None = None
) -> dict[str, list[Check]]:
    """The default checks of each gate (see the module docstring)."""
    key = "evidence/{service}/{version}/{gate}.json"
    limits = limits or EvidenceLimits()
    checks: dict[str, list[Check]] = {
        g: [EvidenceCheck(key, gate=g, limits=limits)] for g in GATES[:5]
    }
    checks["security_scan"].append(ArtifactCheck())
    checks["rollback_plan"] = [RollbackPlanCheck(allow_first_install=allow_first_install)]
    checks["release_not_marked_bad"] = [NotMarkedBadCheck()]
    return checks


def evaluate_checklist(
    checks: Mapping[str, Sequence[Check]],
    facts: ChecklistFacts,
    *,
    on_gate: Callable[[GateResult], None] | None = None,
) -> ChecklistReport:
    """Run every gate's checks (all gates, even after a failure, for a complete report).

    A check that raises fails its gate with the exception's message as evidence. Gates missing
    from ``checks`` fail ("no check configured"): every gate is mandatory. A release marked bad
    that passes only by an emergency override is listed in the report's ``overrides``.
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
    overrides = tuple(
        r.evidence for r in results if r.passed and "EMERGENCY OVERRIDE" in r.evidence
    )
    return ChecklistReport(tuple(results), overrides)
