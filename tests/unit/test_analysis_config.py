"""The verification keys of ops.yaml (services.*.analysis / staging_tests / evidence, policy
inconclusive): bad input is refused with the path of the bad field."""

from __future__ import annotations

import copy

import pytest

from kmpops.config import parse_config
from kmpops.errors import ConfigError
from kmpops.stack import SAMPLE_SERVICE_VERIFICATION

BASE = {
    "services": {
        "web": {
            "deploy_path": "/srv/web",
            "restart": "true",
            "health_check": {"url": "http://{address}:1/health"},
            **copy.deepcopy(SAMPLE_SERVICE_VERIFICATION),
        }
    }
}


def with_change(change):
    data = copy.deepcopy(BASE)
    change(data["services"]["web"])
    return data


def test_the_stack_configuration_is_valid():
    web = parse_config(copy.deepcopy(BASE)).services["web"]
    assert [m.name for m in web.analysis] == ["error-ratio", "error-log"]
    assert web.staging_tests is not None and web.staging_tests.traffic is not None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda w: w["analysis"][0].update(success="below 5%"), "is not a condition"),
        (lambda w: w["analysis"][0].update(query="x[{since}]"), "unknown placeholder {since}"),
        (lambda w: w["analysis"][0].update(log={"path": "/l", "pattern": "E"}), "not both"),
        (lambda w: w["analysis"][1].pop("log"), "give a query and/or scrape, or a log"),
        (lambda w: w["analysis"][1]["log"].update(pattern="(unclosed"), "not a regular expr"),
        (lambda w: w["analysis"][1]["log"].update(path="/srv/../etc/shadow"), "acceptable path"),
        (lambda w: w["analysis"][0]["scrape"]["counter"].update(metric="9x"), "metric name"),
        (lambda w: w["analysis"][0]["scrape"]["counter"].update(match={"a-b": "1"}), "label"),
        (lambda w: w["analysis"][0].update(count=0), "greater than or equal to 1"),
        (lambda w: w["analysis"].append(dict(w["analysis"][1])), "duplicate measurement names"),
        (
            lambda w: (w["analysis"][0].pop("requests_query"), w["analysis"][0].pop("scrape")),
            "min_requests needs requests_query",
        ),
        (lambda w: w["staging_tests"].pop("traffic"), "give a command and/or traffic"),
        (lambda w: w["staging_tests"]["traffic"].update(requests=0), "greater than or equal"),
        (lambda w: w["evidence"]["max_findings"].update(severe=1), "severe"),
        (lambda w: w["evidence"].update(min_test=1), "unknown key"),
    ],
)
def test_bad_verification_config_is_refused(change, problem):
    with pytest.raises(ConfigError) as err:
        parse_config(with_change(change))
    text = "; ".join(err.value.problems)
    assert "services.web." in text and problem in text


def test_inconclusive_policy_is_fail_or_pause():
    cfg = parse_config({"environments": {"p": {"policy": {"inconclusive": "pause"}}}})
    assert cfg.environments["p"].policy.inconclusive == "pause"
    with pytest.raises(ConfigError, match="inconclusive"):
        parse_config({"environments": {"p": {"policy": {"inconclusive": "pass"}}}})
