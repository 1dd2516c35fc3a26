"""become: commands through sudo -n as exact words, the config that turns it on, and the sudo
rules generated for an environment (checked by the real visudo where it is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kmpops import become
from kmpops.config import parse_config
from kmpops.errors import ConfigError, UnsafeValueError
from kmpops.shellsafe import render_argv

# (template, values, words or the error fragment)
ARGV_CASES = [
    (
        "{deploy_path}/current/control restart --port {web_port}",
        {"deploy_path": "/srv/web", "web_port": 8080},
        ["/srv/web/current/control", "restart", "--port", "8080"],
    ),
    # a value is one word, whatever it holds: it never splits or expands
    (
        "/bin/systemctl restart {unit}",
        {"unit": "web; id"},
        ["/bin/systemctl", "restart", "web; id"],
    ),
    (
        "/usr/bin/apt-get -y install  {pkg}",
        {"pkg": "curl"},
        ["/usr/bin/apt-get", "-y", "install", "curl"],
    ),
    ("/bin/a && /bin/b", {}, "'&&' needs a shell"),
    ("/bin/a | /bin/b", {}, "'|' needs a shell"),
    ("/bin/echo $HOME", {}, "'$HOME' needs a shell"),
    ("/bin/echo 'x'", {}, "\"'x'\" needs a shell"),
    ("/bin/rm *", {}, "'*' needs a shell"),
    ("/bin/a > /tmp/x", {}, "'>' needs a shell"),
    ("/bin/a {missing}", {}, "placeholder {missing} has no value"),
    ("/bin/a {x!r}", {"x": "1"}, "is not a plain name"),
    ("/bin/a {x}", {"x": "two\nlines"}, "contains a NUL or newline"),
    ("   ", {}, "is empty"),
]


@pytest.mark.parametrize(("template", "values", "expected"), ARGV_CASES)
def test_render_argv(template, values, expected):
    if isinstance(expected, list):
        assert render_argv(template, values) == expected
    else:
        with pytest.raises(UnsafeValueError) as err:
            render_argv(template, values)
        assert expected in str(err.value)


def ops(**env_fields):
    host = {
        "name": "h1",
        "address": "10.0.0.1",
        "user": "deploy",
        "key_file": "/k/id",
        "known_hosts": "/k/known_hosts",
        "vars": {"root": "/srv/h1", "web_port": 8080},
    }
    other = {**host, "name": "h2", "address": "10.0.0.2", "become": False, "vars": {**host["vars"]}}
    return {
        "environments": {"production": {"hosts": [host, other], **env_fields}},
        "services": {
            "web": {
                "deploy_path": "{root}/web",
                "restart": "/bin/systemctl restart web-{web_port}",
                "health_check": {"url": "http://{address}:{web_port}/health"},
                "drain": "touch {deploy_path}/drain && echo drained",
            }
        },
    }


def test_hosts_inherit_the_environments_become_unless_they_set_their_own():
    cfg = parse_config(ops(become=True, become_user="svc"))
    h1, h2 = cfg.environments["production"].hosts
    assert (h1.become, h1.become_user, h1.become_method) == (True, "svc", "sudo")
    assert (h2.become, h2.become_user) == (False, "svc")
    assert become.become_of(h1) == become.Become("svc")
    assert become.become_of(h2) is None


def test_service_command_goes_through_sudo_only_where_become_is_on():
    cfg = parse_config(ops(become=True))
    svc = cfg.service("web")
    h1, h2 = cfg.environments["production"].hosts
    values = {**h1.template_values(), "deploy_path": svc.deploy_path_for(h1)}
    assert become.service_command(svc, "restart", h1, values) == (
        "sudo -n -u root -- /bin/systemctl restart web-8080"
    )
    assert become.service_command(svc, "restart", h2, values) == "/bin/systemctl restart web-8080"
    # drain is not a become command by default: the login shell runs it as written
    assert become.service_command(svc, "drain", h1, values) == (
        "touch /srv/h1/web/drain && echo drained"
    )


@pytest.mark.parametrize(
    ("restart", "become_commands", "message"),
    [
        ("systemctl restart web", ["restart"], "must start with an absolute path"),
        ("/bin/systemctl restart web && echo ok", ["restart"], "'&&' needs a shell"),
        ("/bin/systemctl restart web", ["restart", "drain"], "services.web.drain (a become"),
    ],
)
def test_become_commands_must_be_exact_words(restart, become_commands, message):
    data = ops(become=True)
    data["services"]["web"].update(restart=restart, become_commands=become_commands)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)
    # without become anywhere the same service is valid: the login shell runs it
    parse_config(ops() | {"services": data["services"]})


def test_only_sudo_is_a_become_method():
    with pytest.raises(ConfigError) as err:
        parse_config(ops(become=True, become_method="su"))
    assert "become_method" in str(err.value)


def test_sudoers_rules_name_each_hosts_commands_exactly():
    data = ops(become=True)
    data["environments"]["production"]["hosts"][1]["become"] = True
    data["environments"]["production"]["hosts"][1]["vars"]["web_port"] = 9090
    cfg = parse_config(data)
    text = become.sudoers_rules(cfg, "production", extra={"h1": [["/usr/bin/apt-get", "update"]]})
    rules = [line for line in text.splitlines() if not line.startswith("#")]
    assert rules == [
        "deploy ALL=(root) NOPASSWD: /bin/systemctl restart web-8080",
        "deploy ALL=(root) NOPASSWD: /usr/bin/apt-get update",
        "deploy ALL=(root) NOPASSWD: /bin/systemctl restart web-9090",
    ]
    if shutil.which("visudo"):
        done = subprocess.run(
            ["visudo", "-cf", "-"], input=text, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_sudoers_rules_escape_what_sudoers_reads_specially_and_refuse_the_rest():
    data = ops(become=True)
    data["services"]["web"]["restart"] = "/bin/systemctl restart web@{web_port}:a,b=c"
    cfg = parse_config(data)
    text = become.sudoers_rules(cfg, "production")
    assert "NOPASSWD: /bin/systemctl restart web@8080\\:a\\,b\\=c" in text
    data["environments"]["production"]["hosts"][0]["vars"]["web_port"] = "8080 *"
    with pytest.raises(UnsafeValueError) as err:
        become.sudoers_rules(parse_config(data), "production")
    assert "cannot be written as an exact sudoers rule" in str(err.value)


def test_a_program_under_the_deploy_path_is_flagged():
    data = ops(become=True)
    data["services"]["web"]["restart"] = "{deploy_path}/current/control restart"
    text = become.sudoers_rules(parse_config(data), "production")
    assert "# WARNING h1: /srv/h1/web/current/control lies under the deploy path" in text


@pytest.mark.parametrize(
    ("stderr", "why"),
    [
        ("sudo: a password is required\n", "sudo: a password is required"),
        (
            "Sorry, user deploy is not allowed to execute '/bin/x' as root on h1.\n",
            "Sorry, user deploy is not allowed to execute '/bin/x' as root on h1.",
        ),
        ("web stopped\ncontrol: web did not answer\n", None),
        ("", None),
    ],
)
def test_refusal_tells_sudo_from_the_command(stderr, why):
    assert become.refusal(stderr) == why
