"""kmpops.inventory: Ansible inventories (INI and YAML) into ops.yaml hosts, as case tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmpops.config import parse_config
from kmpops.errors import ConfigError
from kmpops.inventory import (
    InventoryError,
    detect_format,
    map_environments,
    parse_inventory,
    unimported_hosts,
)

DEFAULTS = {"known_hosts": "/etc/kmpops/known_hosts", "key_file": "/etc/kmpops/id_ed25519"}

INI = """\
# a typical two-environment inventory
[web]
web[01:02].example.com ansible_port=2222
[db]
db1.example.com ansible_host=10.0.0.5 ansible_user=postgres

[production:children]
web
db

[production:vars]
ansible_user=deploy
ansible_ssh_private_key_file=keys/prod_key
region=eu-west

[staging]
stg1 ansible_host=10.1.0.1 ansible_ssh_common_args='-J jump@bastion.example.com:2200'
"""

YAML = """\
all:
  vars:
    region: global
  children:
    production:
      vars:
        ansible_user: deploy
        ansible_ssh_private_key_file: keys/prod_key
        region: eu-west
      children:
        web:
          hosts:
            web[01:02].example.com:
              ansible_port: 2222
        db:
          hosts:
            db1.example.com:
              ansible_host: 10.0.0.5
              ansible_user: postgres
    staging:
      hosts:
        stg1:
          ansible_host: 10.1.0.1
          ansible_ssh_common_args: -o ProxyJump=jump@bastion.example.com:2200
"""


@pytest.mark.parametrize(("fmt", "text"), [("ini", INI), ("yaml", YAML)])
def test_both_forms_map_the_same(fmt, text):
    inventory = parse_inventory(text, fmt, source="hosts")
    envs = {e.name: e for e in map_environments(inventory, defaults=DEFAULTS, base=Path("/inv"))}
    assert sorted(envs) == ["production", "staging"]
    production = {h["name"]: h for h in envs["production"].hosts}
    assert production["web01.example.com"] == {
        **DEFAULTS,
        "name": "web01.example.com",
        "address": "web01.example.com",
        "port": 2222,
        "user": "deploy",
        "key_file": "/inv/keys/prod_key",
        "vars": {"region": "eu-west"},
    }
    # Host vars win over group vars (the db host's own user).
    assert production["db1.example.com"]["user"] == "postgres"
    assert production["db1.example.com"]["address"] == "10.0.0.5"
    assert list(production) == ["web01.example.com", "web02.example.com", "db1.example.com"]
    assert envs["staging"].hosts[0]["jump"] == [
        {"address": "bastion.example.com", "user": "jump", "port": 2200}
    ]
    # The result is a valid ops.yaml.
    cfg = parse_config({"environments": {e.name: {"hosts": e.hosts} for e in envs.values()}})
    assert cfg.environments["staging"].hosts[0].jump[0].port == 2200


# (inventory line, expected host fields or None, expected not-mapped key or None)
VALUE_CASES = [
    ("h1 ansible_host=10.0.0.1", {"address": "10.0.0.1"}, None),
    ("h1 ansible_ssh_host=h1.lan", {"address": "h1.lan"}, None),
    ("h1 ansible_port=2022", {"port": 2022}, None),
    ("h1 ansible_ssh_port=2022", {"port": 2022}, None),
    ("h1 ansible_user=ops", {"user": "ops"}, None),
    ("h1 ansible_ssh_user=ops", {"user": "ops"}, None),
    ("h1 ansible_ssh_private_key_file=/k/id", {"key_file": "/k/id"}, None),
    ("h1 ansible_connection=ssh", {}, None),
    ("h1 ansible_become=yes", {"become": True}, None),
    ("h1 ansible_become=False", {"become": False}, None),
    ("h1 ansible_become_user=postgres", {"become_user": "postgres"}, None),
    ("h1 ansible_become_method=sudo", {"become_method": "sudo"}, None),
    ("h1 ansible_become_flags=-H", {}, "ansible_become_flags"),
    ("h1 ansible_python_interpreter=/usr/bin/python3", {}, "ansible_python_interpreter"),
    ("h1 rack=r12 slot=3", {"vars": {"rack": "r12", "slot": 3}}, None),
    ("h1 canary=true", {"vars": {"canary": "true"}}, None),
    ("h1 greeting='{{ hello }}'", {}, "greeting"),
    (
        "h1 ansible_ssh_common_args='-J a@b1:2201,b2'",
        {"jump": [{"address": "b1", "user": "a", "port": 2201}, {"address": "b2"}]},
        None,
    ),
]


@pytest.mark.parametrize(("line", "fields", "skipped"), VALUE_CASES)
def test_host_values(line, fields, skipped):
    inventory = parse_inventory(f"[prod]\n{line}\n", "ini", source="inv")
    [env] = map_environments(inventory)
    [host] = env.hosts
    expected = {"name": "h1", "address": "h1", **fields}
    assert {k: host[k] for k in expected} == expected
    assert [n.key for n in env.not_mapped] == ([skipped] if skipped else [])
    if skipped:
        assert env.not_mapped[0].where == "inv:2"


# (inventory text, format, message fragment naming the line)
ERROR_CASES = [
    ("[prod]\nh1 ansible_port=99999\n", "ini", "inv:2: port 99999 is not between 1 and 65535"),
    ("[prod]\nh1 ansible_port=ssh\n", "ini", "inv:2: port 'ssh' is not a number"),
    ("[prod]\nh1 ansible_host='x;reboot'\n", "ini", "inv:2: 'x;reboot' is not a host name"),
    ("[prod]\nh1 ansible_user='root -o'\n", "ini", "inv:2: user 'root -o' is not a safe"),
    ("[prod]\nh1 ansible_password=hunter2\n", "ini", "inv:2: ansible_password puts a password"),
    ("[prod]\nh1 ansible_connection=winrm\n", "ini", "inv:2: ansible_connection 'winrm'"),
    ("[prod]\nh1 ansible_frobnicate=1\n", "ini", "inv:2: unknown Ansible variable"),
    ("[prod]\nh1 ansible_host='{{ ip }}'\n", "ini", "inv:2: ansible_host is a Jinja template"),
    ("[prod]\n\n'h;1'\n", "ini", "inv:3: host name 'h;1' is not a safe name"),
    ("[prod]\nh1 oops\n", "ini", "inv:2: 'oops' is not key=value"),
    ("[prod\nh1\n", "ini", "inv:1: '[prod' is not a section header"),
    ("[prod]\nweb[a:c]\n", "ini", "inv:2: host pattern 'web[a:c]' is not a numeric range"),
    (
        "[prod]\nh1 ansible_ssh_common_args='-o StrictHostKeyChecking=no'\n",
        "ini",
        "inv:2: ansible_ssh_common_args: option 'StrictHostKeyChecking' is not supported",
    ),
    ("[a:children]\nb\n[b:children]\na\n", "ini", "is its own descendant"),
    ("[prod:vars]\nansible_port=0\n[prod]\nh1\n", "ini", "inv:2: port 0 is not between"),
    ("prod:\n  hosts:\n    h1:\n      ansible_port: 70000\n", "yaml", "inv:4: port 70000"),
    ("prod:\n  hostz:\n    h1:\n", "yaml", "inv:2: unknown key 'hostz' in group prod"),
    ("prod:\n  hosts:\n    h1:\n      pw: !vault |\n        1234\n", "yaml", "inv:4:"),
    ("prod:\n  hosts: [h1, h2]\n", "yaml", "inv:2: prod.hosts must be a mapping"),
    ("prod: [\n", "yaml", "malformed YAML"),
    (
        "[prod]\nh1 ansible_become_method=su\n",
        "ini",
        "inv:2: ansible_become_method 'su' is not supported (kmp-ops becomes through sudo -n",
    ),
    ("[prod]\nh1 ansible_become=maybe\n", "ini", "inv:2: ansible_become 'maybe' is not a boolean"),
    ("[prod]\nh1 ansible_become_user='a b'\n", "ini", "inv:2: user 'a b' is not a safe user"),
]


@pytest.mark.parametrize(("text", "fmt", "message"), ERROR_CASES)
def test_bad_inventories_name_the_line(text, fmt, message):
    with pytest.raises(InventoryError) as err:
        map_environments(parse_inventory(text, fmt, source="inv"))
    assert message in str(err.value)


def test_group_selection_and_renaming():
    inventory = parse_inventory(INI, "ini", source="hosts")
    [env] = map_environments(inventory, {"web": "production"})
    assert env.name == "production" and env.group == "web"
    assert [h["name"] for h in env.hosts] == ["web01.example.com", "web02.example.com"]
    with pytest.raises(InventoryError, match="no group 'nope'"):
        map_environments(inventory, {"nope": "production"})
    with pytest.raises(InventoryError, match=r"host web01\.example\.com is in both"):
        map_environments(inventory, {"web": "a", "production": "b"})


def test_child_group_vars_win_over_parent_vars():
    text = "[prod:children]\nweb\n[prod:vars]\nansible_port=22\n[web:vars]\nansible_port=2200\n"
    text += "[web]\nh1\n"
    [env] = map_environments(parse_inventory(text, "ini"), {"prod": "prod"})
    assert env.hosts[0]["port"] == 2200


@pytest.mark.parametrize(
    ("text", "path", "fmt"),
    [
        ("[web]\nh1\n", None, "ini"),
        ("all:\n  hosts:\n", None, "yaml"),
        ("---\nall: {}\n", None, "yaml"),
        ("h1\n", "hosts.yml", "yaml"),
        ("all:\n", "hosts.ini", "ini"),
        ("h1 ansible_port=22\n", None, "ini"),
    ],
)
def test_detect_format(text, path, fmt):
    assert detect_format(text, path) == fmt


def test_ops_yaml_inventory_is_read_live(tmp_path):
    (tmp_path / "hosts.ini").write_text(INI)
    data = {
        "environments": {
            "production": {
                "inventory": {"path": "hosts.ini", "defaults": DEFAULTS},
                "hosts": [
                    {
                        "name": "extra",
                        "address": "10.9.9.9",
                        "key_file": "/k",
                        "known_hosts": "/kh",
                    }
                ],
            }
        }
    }
    cfg = parse_config(data, source=str(tmp_path / "ops.yaml"))
    hosts = cfg.environments["production"].hosts
    assert [h.name for h in hosts] == [
        "extra",
        "web01.example.com",
        "web02.example.com",
        "db1.example.com",
    ]
    assert hosts[1].key_file == tmp_path / "keys" / "prod_key"
    assert cfg.environments["production"].inventory.path == Path("hosts.ini")


@pytest.mark.parametrize(
    ("inventory", "message"),
    [
        ({"path": "missing.ini"}, "environments.production.inventory: "),
        ({"path": "hosts.ini", "group": "nope"}, "no group 'nope'"),
        ({"path": "hosts.ini", "colour": "red"}, "environments.production.inventory.colour"),
        ({"path": "bad.ini"}, "bad.ini:2: port 0 is not between 1 and 65535"),
    ],
)
def test_ops_yaml_inventory_errors(tmp_path, inventory, message):
    (tmp_path / "hosts.ini").write_text(INI)
    (tmp_path / "bad.ini").write_text("[production]\nh1 ansible_port=0\n")
    data = {"environments": {"production": {"inventory": inventory}}}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source=str(tmp_path / "ops.yaml"))
    assert any(message in problem for problem in err.value.problems), err.value.problems


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give key_file, or agent: true"),
        ({"agent": True, "certificate": "/c"}, "a certificate needs the key_file"),
        ({"agent": True, "key_passphrase": "env:X"}, "key_passphrase needs a key_file"),
        ({"key_file": "/k", "agent_socket": "/s"}, "agent_socket needs agent: true"),
        ({"key_file": "/k", "jump": [{"address": "b;x"}]}, "is not a host name"),
        ({"key_file": "/k", "jump": [{"address": "b", "certificate": "/c"}]}, "hop's own key"),
    ],
)
def test_host_connection_fields_are_checked(fields, message):
    host = {"name": "h1", "address": "10.0.0.1", "known_hosts": "/kh", **fields}
    with pytest.raises(ConfigError) as err:
        parse_config({"environments": {"production": {"hosts": [host]}}})
    assert any(message in problem for problem in err.value.problems), err.value.problems


@pytest.mark.parametrize(
    ("text", "fmt", "groups", "left"),
    [
        ("lonely\n[prod]\nh1\n", "ini", None, ["lonely (inv:1)"]),
        (
            "all:\n  hosts:\n    lonely:\n  children:\n    prod:\n      hosts:\n        h1:\n",
            "yaml",
            None,
            ["lonely (inv:3)"],
        ),
        ("[prod]\nh1\n[qa]\nq1\n", "ini", {"prod": "prod"}, ["q1 (inv:4)"]),
        ("[prod]\nh1\n", "ini", None, []),
    ],
)
def test_hosts_left_out_are_reported(text, fmt, groups, left):
    inventory = parse_inventory(text, fmt, source="inv")
    assert unimported_hosts(inventory, map_environments(inventory, groups)) == left
