"""Metrics: the exposition parser as a case table; a real Prometheus scraping two sample services.

Ports (below Linux's ephemeral range): sample services 24521/24522, Prometheus 24301, nothing
on 24399.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kmpops.connectors.metrics import (
    ExpositionError,
    MetricsUnavailable,
    PrometheusClient,
    QueryError,
    Sample,
    counter_delta,
    error_rate_from_scrape,
    error_ratio,
    histogram_quantile,
    latency_quantile_from_scrape,
    parse_exposition,
    scrape,
)
from kmpops.errors import ConnectorError, TransientError
from kmpops.stack import prometheus
from kmpops.stack._proc import port_open
from kmpops.stack.sample_service import build_release, generate_traffic, install_release

# The sample service's metric names (config in ops.yaml; the connector assumes none).
NAMES = {"requests_metric": "web_requests_total", "errors_metric": "web_errors_total"}

GOOD_PORT, BAD_PORT, PROM_PORT, DEAD_PORT = 24521, 24522, 24301, 24399

# -- parser: a table of cases -------------------------------------------------------------------

PARSE_CASES = [
    ("plain", "up 1", [({"__name__": "up"}, 1.0, None)]),
    (
        "help, type and comments skipped",
        "# HELP x_total Things.\n# TYPE x_total counter\n# just a comment\n\nx_total 3\n",
        [({"__name__": "x_total"}, 3.0, None)],
    ),
    (
        "labels, trailing comma, spaces",
        'req_total{code="200", path="/a",} 7',
        [({"__name__": "req_total", "code": "200", "path": "/a"}, 7.0, None)],
    ),
    (
        "escaped quote, backslash, newline in label values",
        r'm{a="say \"hi\"",b="c:\\tmp",c="x\ny"} 1',
        [({"__name__": "m", "a": 'say "hi"', "b": "c:\\tmp", "c": "x\ny"}, 1.0, None)],
    ),
    (
        "braces and commas inside a value",
        'm{a="{x,y}"} 2',
        [({"__name__": "m", "a": "{x,y}"}, 2.0, None)],
    ),
    ("timestamp in ms", "m 1.5e3 1700000000123", [({"__name__": "m"}, 1500.0, 1700000000.123)]),
    (
        "negative and +Inf",
        "a -2.5\nb +Inf\nc -Inf",
        [
            ({"__name__": "a"}, -2.5, None),
            ({"__name__": "b"}, math.inf, None),
            ({"__name__": "c"}, -math.inf, None),
        ],
    ),
    ("empty label set", "m{} 4", [({"__name__": "m"}, 4.0, None)]),
    ("colon in name", "job:rate5m 0.25", [({"__name__": "job:rate5m"}, 0.25, None)]),
    (
        "histogram buckets, sum, count",
        '# TYPE d histogram\nd_bucket{le="0.1"} 1\nd_bucket{le="+Inf"} 3\nd_sum 0.7\nd_count 3',
        [
            ({"__name__": "d_bucket", "le": "0.1"}, 1.0, None),
            ({"__name__": "d_bucket", "le": "+Inf"}, 3.0, None),
            ({"__name__": "d_sum"}, 0.7, None),
            ({"__name__": "d_count"}, 3.0, None),
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_parse_exposition(text: str, expected: list) -> None:
    got = [(s.labels, s.value, s.timestamp) for s in parse_exposition(text)]
    assert got == expected


def test_parse_nan() -> None:
    [sample] = parse_exposition("m NaN")
    assert math.isnan(sample.value) and sample.name == "m"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1bad 1", "metric name"),
        ("m{a=1} 1", "'\"'"),
        ('m{a="x} 1', "unterminated"),
        ('m{a="x" b="y"} 1', "','"),
        ('m{a="x",a="y"} 1', "duplicate"),
        ("m", "value"),
        ("m 1 2 3", "value"),
        ("m one", "not a number"),
        ("m 1_000", "not a number"),
        ("m 1 1.5", "milliseconds"),
        ('m{a="x"}1', "whitespace"),
    ],
)
def test_parse_errors_name_the_line(text: str, problem: str) -> None:
    with pytest.raises(ExpositionError, match="line 2") as info:
        parse_exposition("ok 1\n" + text)
    assert problem in str(info.value)


def s(name: str, value: float, **labels: str) -> Sample:
    return Sample({"__name__": name, **labels}, value)


def test_counter_delta_handles_resets_and_new_series() -> None:
    before = [s("r", 100, code="200"), s("r", 10, code="500")]
    after = [s("r", 150, code="200"), s("r", 4, code="500"), s("r", 2, code="503")]
    assert counter_delta(before, after, "r") == 50 + 4 + 2
    assert counter_delta(before, after, "r", code="200") == 50


def test_error_rates() -> None:
    before = [s("web_requests_total", 100, code="200"), s("web_errors_total", 0)]
    after = [
        s("web_requests_total", 170, code="200"),
        s("web_requests_total", 30, code="500"),
        s("web_errors_total", 30),
    ]
    assert error_rate_from_scrape(before, after, **NAMES) == pytest.approx(0.3)
    assert error_ratio(after, **NAMES) == pytest.approx(30 / 200)
    assert error_rate_from_scrape(after, after, **NAMES) == 0.0


def test_histogram_quantile_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(1.0, {0.1: 1.0, math.inf: 2.0}) == 0.1  # rank in +Inf
    assert math.isnan(histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}))
    assert math.isnan(histogram_quantile(0.5, {0.1: 3.0}))
    before = parse_exposition('d_bucket{le="0.1"} 10\nd_bucket{le="1"} 10\nd_bucket{le="+Inf"} 10')
    after = parse_exposition('d_bucket{le="0.1"} 10\nd_bucket{le="1"} 20\nd_bucket{le="+Inf"} 20')
    assert latency_quantile_from_scrape(0.5, before, after, histogram="d") == pytest.approx(0.55)


# -- against the real thing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two sample services started with their own ``control``: good and 30 %-errors."""
    import subprocess

    root = tmp_path_factory.mktemp("metrics")
    started: dict[str, Path] = {}
    try:
        for name, variant, port in (("good", "good", GOOD_PORT), ("bad", "errors", BAD_PORT)):
            deploy = root / name
            install_release(build_release(f"1.0.0-{name}", root / "dist", variant=variant), deploy)
            started[name] = deploy / "current"
            subprocess.run(
                [str(deploy / "current" / "control"), "start", "--port", str(port)],
                check=True,
                capture_output=True,
                timeout=30,
            )
        yield started
    finally:
        for current in started.values():
            subprocess.run([str(current / "control"), "stop"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def prom(
    services: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[prometheus.PromInfo]:
    root = tmp_path_factory.mktemp("prom")
    targets = {"web": [f"127.0.0.1:{GOOD_PORT}", f"127.0.0.1:{BAD_PORT}"]}
    info = prometheus.start(root, PROM_PORT, scrape_targets=targets, scrape_interval="1s")
    print(f"prometheus started in {info.start_seconds:.2f}s")
    try:
        yield info
    finally:
        prometheus.stop(root)
        assert not port_open(PROM_PORT)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_prometheus_sees_the_error_ratio(prom: prometheus.PromInfo) -> None:
    client = PrometheusClient(prom.url)
    assert client.ready()
    # Prometheus scrapes each target on its own schedule: wait until both have been up once.
    targets = wait_for(
        lambda: up if len(up := [t for t in client.targets() if t["health"] == "up"]) == 2 else None
    )
    assert targets, f"both targets never up: {client.targets()}"
    assert {t["instance"] for t in targets} == {f"127.0.0.1:{GOOD_PORT}", f"127.0.0.1:{BAD_PORT}"}
    assert {t["job"] for t in targets} == {"web"}

    ratio_query = (
        "sum by (instance) (rate(web_errors_total[10s]))"
        " / sum by (instance) (rate(web_requests_total[10s]))"
    )

    def ratios() -> dict[str, float] | None:
        for port in (GOOD_PORT, BAD_PORT):
            generate_traffic(f"http://127.0.0.1:{port}/work", requests=40, concurrency=4)
        got = {s.labels["instance"]: s.value for s in client.query(ratio_query)}
        return got if len(got) == 2 and not any(math.isnan(v) for v in got.values()) else None

    got = wait_for(ratios, timeout=40.0)
    assert got, "Prometheus never had two samples of both counters"
    assert got[f"127.0.0.1:{BAD_PORT}"] > 0.2
    assert got[f"127.0.0.1:{GOOD_PORT}"] == 0.0

    [version] = client.query('web_version_info{variant="errors"}')
    assert version.labels["version"] == "1.0.0-bad" and version.value == 1.0
    [scalar] = client.query("1 + 1", at=datetime.now(UTC))
    assert scalar.labels == {} and scalar.value == 2.0

    # Traffic flows without pause while we wait, so every 5 s window of the range holds requests
    # (a burst per poll left windows between bursts at rate 0: a race with the scrape schedule).
    # The wait is for exactly what the assertions below need: 4+ points, every one of them > 0.
    stop = threading.Event()

    def steady_traffic() -> None:
        while not stop.is_set():
            generate_traffic(f"http://127.0.0.1:{GOOD_PORT}/", requests=5, concurrency=1)
            stop.wait(0.1)

    def range_points() -> list | None:
        end = datetime.now(UTC)
        series = client.query_range(
            "sum(rate(web_requests_total[5s]))", start=end - timedelta(seconds=10), end=end, step=1
        )
        if len(series) != 1 or len(series[0].points) < 4:
            return None
        return series if all(v > 0 for _, v in series[0].points) else None

    traffic = threading.Thread(target=steady_traffic, daemon=True)
    traffic.start()
    try:
        series = wait_for(range_points, timeout=45.0)
    finally:
        stop.set()
        traffic.join(timeout=10)
    assert series, "query_range never returned 4 points, all with requests, under steady traffic"
    points = series[0].points
    assert all(b[0] - a[0] == pytest.approx(1.0) for a, b in itertools.pairwise(points))
    assert all(v > 0 for _, v in points)


def test_bad_promql_names_the_problem(prom: prometheus.PromInfo) -> None:
    client = PrometheusClient(prom.url)
    with pytest.raises(QueryError) as info:
        client.query("sum(rate(web_errors_total[1m])")
    err = info.value
    assert not isinstance(err, TransientError)
    assert err.error_type == "bad_data" and "parse error" in err.detail
    assert "sum(rate(web_errors_total[1m])" in str(err)
    with pytest.raises(QueryError, match="query_range"):
        client.query("web_errors_total[1m]")
    with pytest.raises(ValueError):
        client.query_range("up", start=10.0, end=5.0, step=1)


def test_down_prometheus_is_transient() -> None:
    client = PrometheusClient(f"http://127.0.0.1:{DEAD_PORT}", timeout=1.0)
    with pytest.raises(MetricsUnavailable) as info:
        client.query("up")
    assert isinstance(info.value, TransientError)
    assert not client.ready()
    with pytest.raises(TransientError):
        scrape(f"http://127.0.0.1:{DEAD_PORT}/metrics", timeout=1.0)


def test_direct_scrape_error_rate(services: dict[str, Path]) -> None:
    url = f"http://127.0.0.1:{BAD_PORT}"
    before = scrape(f"{url}/metrics")
    assert generate_traffic(f"{url}/", requests=100, concurrency=4)["errors"] == 30
    after = scrape(f"{url}/metrics")
    assert error_rate_from_scrape(before, after, **NAMES) == pytest.approx(0.3)
    assert (
        0
        < latency_quantile_from_scrape(0.9, before, after, histogram="web_request_duration_seconds")
        < 0.5
    )
    good = f"http://127.0.0.1:{GOOD_PORT}/metrics"
    assert error_rate_from_scrape(scrape(good), scrape(good), **NAMES) == 0.0
    with pytest.raises(ConnectorError, match="HTTP 404"):
        scrape(f"{url}/nope")


def test_reload_changes_targets(prom: prometheus.PromInfo) -> None:
    client = PrometheusClient(prom.url)
    prometheus.reload(prom, {"web": [f"127.0.0.1:{GOOD_PORT}"]})
    only_good = wait_for(
        lambda: [t["instance"] for t in client.targets()] == [f"127.0.0.1:{GOOD_PORT}"], 15
    )
    assert only_good
    broken = prom.config_file.parent / "bad-rules.yml"
    broken.write_text("groups: [{name: x, rules: [{alert: A, expr: 'sum('}]}]\n")
    before = prom.config_file.read_text()
    with pytest.raises(prometheus.StackError, match="refused"):
        prometheus.reload(prom, {"web": [f"127.0.0.1:{BAD_PORT}"]}, rule_files=[broken])
    assert prom.config_file.read_text() == before
    assert client.ready()
    with pytest.raises(ValueError):
        prometheus.reload(prom, {"web": ["not a target"]})
