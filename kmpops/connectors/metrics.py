"""Metrics: the Prometheus HTTP API (:class:`PrometheusClient`) and direct ``/metrics`` scrapes.

:func:`scrape` fetches a target's text exposition format (0.0.4) and :func:`parse_exposition`
turns it into :class:`Sample` objects; :func:`error_rate_from_scrape` and
:func:`latency_quantile_from_scrape` compare two scrapes (counters reset-aware), which is what a
deploy's bake stage needs when no Prometheus is configured.

Errors: connection failures, timeouts and 5xx raise :class:`MetricsUnavailable` (a
``TransientError``, worth retrying); a query Prometheus rejects raises :class:`QueryError` with
Prometheus's own message and the query; an unparsable exposition raises :class:`ExpositionError`.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kmpops.errors import ConnectorError, TransientError
from kmpops.redact import redact

__all__ = [
    "ExpositionError",
    "MetricsUnavailable",
    "PrometheusClient",
    "QueryError",
    "Sample",
    "Series",
    "counter_delta",
    "error_rate_from_scrape",
    "error_ratio",
    "histogram_quantile",
    "latency_quantile_from_scrape",
    "parse_exposition",
    "scrape",
    "sum_values",
]

MAX_POINTS_PER_SERIES = 11_000  # Prometheus refuses larger range queries
_MAX_BODY = 64 * 1024 * 1024


class MetricsUnavailable(TransientError):
    """Prometheus or a /metrics endpoint could not be reached, timed out or answered 5xx."""


class QueryError(ConnectorError):
    """Prometheus rejected a query; ``error_type`` and ``detail`` are Prometheus's own words."""

    def __init__(self, query: str, error_type: str, detail: str) -> None:
        self.query = query
        self.error_type = error_type
        self.detail = detail
        super().__init__(f"Prometheus rejected the query {query!r}: {error_type}: {detail}")


class ExpositionError(ConnectorError):
    """A /metrics page is not valid Prometheus text format; names the line."""


@dataclass(frozen=True)
class Sample:
    """One value of one series; ``labels`` include ``__name__`` when the series has a name."""

    labels: dict[str, str]
    value: float
    timestamp: float | None = None

    @property
    def name(self) -> str:
        """The metric name (``""`` for a scalar or an expression result without a name)."""
        return self.labels.get("__name__", "")


@dataclass(frozen=True)
class Series:
    """A range-query result: one series' labels and its ``(unix seconds, value)`` points."""

    labels: dict[str, str]
    points: list[tuple[float, float]] = field(default_factory=list)


# -- text exposition format -------------------------------------------------------------------

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FLOAT = re.compile(
    r"[+-]?(?:inf|infinity|nan|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)", re.I
)
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_float(token: str) -> float:
    if not _FLOAT.fullmatch(token):
        raise ValueError(f"not a number: {token!r}")
    return float(token)


def _skip_ws(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _parse_labels(line: str, pos: int, labels: dict[str, str]) -> int:
    """Parse ``{a="x",b="y"}`` starting after ``{``; return the position after ``}``."""
    while True:
        pos = _skip_ws(line, pos)
        if pos < len(line) and line[pos] == "}":
            return pos + 1
        match = _LABEL_NAME.match(line, pos)
        if not match:
            raise ValueError(f"bad label name at column {pos + 1}")
        name = match.group()
        if name in labels:
            raise ValueError(f"duplicate label {name!r}")
        pos = _skip_ws(line, match.end())
        if line[pos : pos + 1] != "=":
            raise ValueError(f"expected '=' after label {name!r}")
        pos = _skip_ws(line, pos + 1)
        if line[pos : pos + 1] != '"':
            raise ValueError(f"expected '\"' to open the value of label {name!r}")
        pos += 1
        chars: list[str] = []
        while True:
            if pos >= len(line):
                raise ValueError(f"unterminated value of label {name!r}")
            char = line[pos]
            if char == "\\" and pos + 1 < len(line):
                nxt = line[pos + 1]
                chars.append(_ESCAPES.get(nxt, "\\" + nxt))
                pos += 2
                continue
            if char == '"':
                pos += 1
                break
            chars.append(char)
            pos += 1
        labels[name] = "".join(chars)
        pos = _skip_ws(line, pos)
        if line[pos : pos + 1] == ",":
            pos += 1
        elif line[pos : pos + 1] != "}":
            raise ValueError(f"expected ',' or '}}' after label {name!r}")


def _parse_sample(line: str) -> Sample:
    match = _METRIC_NAME.match(line)
    if not match:
        raise ValueError("a sample line must start with a metric name")
    labels = {"__name__": match.group()}
    pos = _skip_ws(line, match.end())
    if line[pos : pos + 1] == "{":
        pos = _parse_labels(line, pos + 1, labels)
        if pos < len(line) and line[pos] not in " \t":
            raise ValueError("expected whitespace before the value")
    elif pos == match.end() and pos < len(line):
        raise ValueError("expected whitespace before the value")
    rest = line[pos:].split()
    if len(rest) not in (1, 2):
        raise ValueError("expected a value and an optional timestamp")
    value = _parse_float(rest[0])
    timestamp = None
    if len(rest) == 2:
        if not re.fullmatch(r"-?[0-9]+", rest[1]):
            raise ValueError(f"timestamp {rest[1]!r} is not integer milliseconds")
        timestamp = int(rest[1]) / 1000.0
    return Sample(labels, value, timestamp)


def parse_exposition(text: str) -> list[Sample]:
    """Parse the Prometheus text format: ``# HELP``/``# TYPE``/comments skipped, labels with
    escapes (``\\\\``, ``\\"``, ``\\n``), ``+Inf``/``-Inf``/``NaN`` values, optional ms timestamps.
    Histogram and summary series come out as their ``_bucket``/``_sum``/``_count`` samples.

    Raises ExpositionError naming the line number and the problem.
    """
    samples = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_parse_sample(line))
        except ValueError as err:
            raise ExpositionError(f"line {number}: {err}: {redact(line)[:200]!r}") from None
    return samples


def _http_get(url: str, timeout: float, what: str) -> tuple[int, bytes]:
    """GET ``url`` and return (status, body); raises MetricsUnavailable when unreachable/5xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read(_MAX_BODY)
    except urllib.error.HTTPError as err:
        body = err.read(_MAX_BODY)
        if err.code >= 500 or err.code == 429:
            raise MetricsUnavailable(f"{what} answered HTTP {err.code}") from None
        return err.code, body
    except (OSError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        raise MetricsUnavailable(f"{what} is unreachable: {reason}") from None


def scrape(url: str, *, timeout: float = 5.0) -> list[Sample]:
    """Fetch ``url`` (a /metrics endpoint) and parse it.

    Raises MetricsUnavailable (transient) if it cannot be reached or answers 5xx, ConnectorError for
    another non-200 answer, ExpositionError for a page that is not the text format.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConnectorError(f"scrape URL must be http(s), not {redact(url)!r}")
    what = f"metrics endpoint {redact(url)}"
    status, body = _http_get(url, timeout, what)
    if status != 200:
        raise ConnectorError(f"{what} answered HTTP {status}")
    return parse_exposition(body.decode("utf-8", errors="replace"))


# -- comparing scrapes ------------------------------------------------------------------------


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _matches(sample: Sample, name: str, match: Mapping[str, str]) -> bool:
    return sample.name == name and all(sample.labels.get(k) == v for k, v in match.items())


def sum_values(samples: Iterable[Sample], name: str, **match: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``match`` (NaN values skipped)."""
    return sum(s.value for s in samples if _matches(s, name, match) and not math.isnan(s.value))


def counter_delta(
    before: Iterable[Sample], after: Iterable[Sample], name: str, **match: str
) -> float:
    """Increase of counter ``name`` between two scrapes, summed over series.

    Per series, like Prometheus's ``increase``: a series whose value went down was reset (the
    process restarted) and counts its whole new value; a series new in ``after`` counts from 0.
    """
    previous = {_key(s.labels): s.value for s in before if _matches(s, name, match)}
    total = 0.0
    for sample in after:
        if not _matches(sample, name, match) or math.isnan(sample.value):
            continue
        old = previous.get(_key(sample.labels), 0.0)
        total += sample.value - old if sample.value >= old else sample.value
    return total


def error_rate_from_scrape(
    before: Iterable[Sample],
    after: Iterable[Sample],
    *,
    requests_metric: str,
    errors_metric: str,
) -> float:
    """Errors delta / requests delta between two scrapes of one target; 0.0 without requests.

    The metric names are the service's (from config); nothing here assumes any."""
    before, after = list(before), list(after)
    requests = counter_delta(before, after, requests_metric)
    if requests <= 0:
        return 0.0
    return min(1.0, counter_delta(before, after, errors_metric) / requests)


def error_ratio(samples: Iterable[Sample], *, requests_metric: str, errors_metric: str) -> float:
    """Errors / requests since the target started (one scrape)."""
    return error_rate_from_scrape(
        [], samples, requests_metric=requests_metric, errors_metric=errors_metric
    )


def _buckets(samples: Iterable[Sample], name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram ``name`` summed over all other labels, by ``le``."""
    buckets: dict[float, float] = defaultdict(float)
    for sample in samples:
        if sample.name == f"{name}_bucket" and "le" in sample.labels:
            buckets[_parse_float(sample.labels["le"])] += sample.value
    return buckets


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus's ``histogram_quantile`` over cumulative ``{upper bound: count}`` buckets.

    Linear interpolation inside the bucket holding the rank; NaN without observations or without
    a ``+Inf`` bucket; the highest finite bound if the rank falls into ``+Inf``.
    """
    if not 0 <= q <= 1:
        return math.inf if q > 1 else -math.inf
    ordered = sorted(buckets.items())
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return math.nan
    rank = q * ordered[-1][1]
    for i, (bound, count) in enumerate(ordered):
        if count >= rank:
            if math.isinf(bound):
                return ordered[-2][0]
            lower, lower_count = (0.0, 0.0) if i == 0 else ordered[i - 1]
            if i == 0 and bound <= 0:
                return bound
            in_bucket = count - lower_count
            if in_bucket <= 0:
                return bound
            return lower + (bound - lower) * (rank - lower_count) / in_bucket
    return ordered[-2][0]


def latency_quantile_from_scrape(
    q: float,
    before: Iterable[Sample],
    after: Iterable[Sample],
    *,
    histogram: str,
) -> float:
    """Quantile ``q`` of the observations made between two scrapes (bucket deltas, reset-aware)."""
    old, new = _buckets(before, histogram), _buckets(after, histogram)
    reset = any(new.get(le, 0.0) < count for le, count in old.items())
    delta = new if reset else {le: count - old.get(le, 0.0) for le, count in new.items()}
    return histogram_quantile(q, delta)


# -- Prometheus HTTP API ----------------------------------------------------------------------


def _unix(moment: datetime | float) -> float:
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # naive times are UTC
        return moment.timestamp()
    return float(moment)


def _value(raw: Any) -> float:
    return float(raw)  # Prometheus sends "NaN", "+Inf", "-Inf" as strings; float() reads them


class PrometheusClient:
    """A narrow client of the Prometheus HTTP API (``/api/v1/query``, ``query_range``, targets).

    Stateless and thread-safe; every call is one HTTP request with ``timeout`` seconds.
    """

    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"Prometheus URL must be http(s)://host:port, not {redact(base_url)!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"PrometheusClient({redact(self.base_url)!r})"

    def _call(self, path: str, params: Mapping[str, str] | None, query: str | None) -> Any:
        """POST (form) or GET ``path``; return ``data`` of a success answer."""
        url = f"{self.base_url}{path}"
        what = f"Prometheus at {redact(self.base_url)}"
        data = urllib.parse.urlencode(params).encode() if params is not None else None
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET")  # noqa: S310
        if data:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                status, body = response.status, response.read(_MAX_BODY)
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read(_MAX_BODY)
        except (OSError, urllib.error.URLError) as err:
            raise MetricsUnavailable(
                f"{what} is unreachable: {getattr(err, 'reason', err)}"
            ) from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if status >= 500 or status == 429:
                raise MetricsUnavailable(f"{what} answered HTTP {status}")
            raise ConnectorError(f"{what} answered HTTP {status} without a JSON body")
        if answer.get("status") == "success" and status == 200:
            return answer.get("data")
        error_type = str(answer.get("errorType", f"http {status}"))
        detail = redact(str(answer.get("error", "")))
        if status >= 500 or status == 429 or error_type in ("timeout", "unavailable", "canceled"):
            raise MetricsUnavailable(f"{what} failed ({error_type}): {detail}")
        if query is not None:
            raise QueryError(redact(query), error_type, detail)
        raise ConnectorError(f"{what} refused {path} ({error_type}): {detail}")

    def query(self, promql: str, *, at: datetime | float | None = None) -> list[Sample]:
        """Evaluate an instant query; a scalar or string result is one Sample without labels.

        Raises QueryError for a query Prometheus rejects (and for a range-vector result: use
        :meth:`query_range`), MetricsUnavailable when Prometheus is down or answers 5xx.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{_unix(at):.3f}"
        data = self._call("/api/v1/query", params, promql)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "vector":
            return [
                Sample(dict(item["metric"]), _value(item["value"][1]), float(item["value"][0]))
                for item in result
            ]
        if kind == "scalar":
            return [Sample({}, _value(result[1]), float(result[0]))]
        if kind == "matrix":
            raise QueryError(
                promql, "range_vector", "the query returns a range vector; use query_range"
            )
        raise QueryError(promql, "unsupported_result", f"result type {kind!r}")

    def query_range(
        self,
        promql: str,
        *,
        start: datetime | float,
        end: datetime | float,
        step: float,
    ) -> list[Series]:
        """Evaluate ``promql`` from ``start`` to ``end`` every ``step`` seconds.

        Raises ValueError for an empty window, a non-positive step or more than 11 000 points;
        QueryError / MetricsUnavailable as :meth:`query`.
        """
        t0, t1 = _unix(start), _unix(end)
        if step <= 0 or t1 < t0:
            raise ValueError(f"query_range needs step > 0 and end >= start (step={step})")
        if (t1 - t0) / step > MAX_POINTS_PER_SERIES:
            raise ValueError(f"query_range would return more than {MAX_POINTS_PER_SERIES} points")
        params = {"query": promql, "start": f"{t0:.3f}", "end": f"{t1:.3f}", "step": f"{step:g}"}
        data = self._call("/api/v1/query_range", params, promql)
        if data.get("resultType") != "matrix":
            raise QueryError(
                promql, "unsupported_result", f"result type {data.get('resultType')!r}"
            )
        return [
            Series(dict(item["metric"]), [(float(t), _value(v)) for t, v in item["values"]])
            for item in data["result"]
        ]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets as Prometheus reports them (``health``, ``lastError``,
        ``scrapeUrl``, ``labels`` ...), each with ``job`` and ``instance`` added for convenience."""
        data = self._call("/api/v1/targets?state=active", None, None)
        targets = []
        for target in data.get("activeTargets", []):
            labels = target.get("labels", {})
            targets.append(
                {**target, "job": labels.get("job", ""), "instance": labels.get("instance", "")}
            )
        return targets

    def ready(self) -> bool:
        """True if Prometheus answers ``/-/ready`` with 200; never raises."""
        try:
            status, _ = _http_get(f"{self.base_url}/-/ready", self.timeout, "Prometheus")
        except MetricsUnavailable:
            return False
        return status == 200
