"""kmpops.shellsafe as tables of cases; quoted output is checked by a real POSIX shell."""

from __future__ import annotations

import subprocess
from pathlib import PurePosixPath

import pytest

from kmpops.errors import UnsafeValueError
from kmpops.shellsafe import join, quote, render_command, validate_name, validate_path

METACHARACTERS = [";", "|", "&", "$", "`", "(", ")", "<", ">", "\n", "'", '"', "\\", "*", "?"]


def _sh_echo_args(command_tail: str) -> list[str]:
    """Run ``printf '%s\\0' <tail>`` in /bin/sh and return the words it received."""
    out = subprocess.run(
        ["/bin/sh", "-c", "printf '%s\\0' " + command_tail],
        capture_output=True,
        check=True,
        timeout=5,
    ).stdout.decode()
    return out.split("\0")[:-1]


@pytest.mark.parametrize(
    "value",
    ["web", "prd-1", "a", "A9", "release_2024.11.27", "v1.2.3-rc.1", "x" * 128, "0day"],
)
def test_validate_name_accepts(value):
    assert validate_name(value, what="host name") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "-rf",
        ".hidden",
        "_x",
        "x" * 129,
        "a b",
        "a/b",
        "..",
        "a\x00b",
        *[f"a{m}b" for m in METACHARACTERS],
        "naïve",
    ],
)
def test_validate_name_refuses(value):
    with pytest.raises(UnsafeValueError) as err:
        validate_name(value, what="host name")
    assert "host name" in str(err.value)
    assert repr(value)[:40] in str(err.value)


def test_validate_name_refuses_non_string():
    with pytest.raises(UnsafeValueError):
        validate_name(42, what="service")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        "/srv/web",
        "srv/web/releases/1.2.3",
        "/srv/web/current/",
        "./VERSION",
        "/",
        "a//b",
        "/opt/app-1/bin/run.sh",
        "/data/backup@2024-11-27T10:00:00",
        "x" * 255,
    ],
)
def test_validate_path_accepts(value):
    assert validate_path(value, what="deploy_path") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../etc/passwd",
        "/srv/../etc",
        "/srv/web/..",
        "-rf",
        "/srv/-rf",
        "/srv/a b",
        "/srv/a\nb",
        "/srv/a\x00b",
        "~/x",
        *[f"/srv/a{m}b" for m in METACHARACTERS],
        "/" + "x" * 4096,
    ],
)
def test_validate_path_refuses(value):
    with pytest.raises(UnsafeValueError) as err:
        validate_path(value, what="deploy_path")
    assert "deploy_path" in str(err.value)


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        "with space",
        "$(touch /tmp/pwned)",
        "`id`",
        "a; rm -rf /",
        "a | b",
        "a && b",
        "$HOME",
        "${IFS}",
        "(sub)",
        "<in >out",
        "line1\nline2",
        "it's",
        'say "hi"',
        "back\\slash",
        "*.txt",
        "-n",
        "ünïcode ✓",
    ],
)
def test_quote_round_trips_through_a_real_shell(value):
    assert _sh_echo_args(quote(value)) == [value]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), (-1, "-1"), (PurePosixPath("/srv/a b"), "'/srv/a b'"), ("abc", "abc")],
)
def test_quote_other_types(value, expected):
    assert quote(value) == expected


@pytest.mark.parametrize("value", ["a\x00b", None, True, 1.5, b"bytes", ["a"]])
def test_quote_refuses(value):
    with pytest.raises(UnsafeValueError):
        quote(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "-l", "/srv/web"],
        ["touch", "file with spaces $(touch /tmp/pwned)"],
        ["echo", ";", "|", "&", "$", "`", "(", ")", "<", ">", "\n"],
        ["printf", "%s", ""],
    ],
)
def test_join_round_trips(argv):
    # The first word is the program; check every word arrives literally.
    assert _sh_echo_args(join(argv)) == argv


@pytest.mark.parametrize("argv", [[], "ls -l", b"ls", ["ok", "nul\x00"]])
def test_join_refuses(argv):
    with pytest.raises(UnsafeValueError):
        join(argv)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("ls {path}", {"path": "/srv/web"}, "ls /srv/web"),
        ("ls {path}", {"path": "/srv/my web"}, "ls '/srv/my web'"),
        ("sleep {n}", {"n": 3}, "sleep 3"),
        ("echo {a} {a}", {"a": "x y"}, "echo 'x y' 'x y'"),
        ("echo {{literal}} {a}", {"a": "b"}, "echo {literal} b"),
        ("true", {}, "true"),
        ("echo {v}", {"v": "$(touch /tmp/pwned)"}, "echo '$(touch /tmp/pwned)'"),
        ("echo {v}", {"v": "it's"}, "echo 'it'\"'\"'s'"),
        (
            "tar -xf {archive} -C {dest}",
            {"archive": "a.tar", "dest": "/r", "extra": "x"},
            "tar -xf a.tar -C /r",
        ),
    ],
)
def test_render_command(template, values, expected):
    assert render_command(template, values) == expected


@pytest.mark.parametrize("meta", METACHARACTERS)
def test_render_command_metacharacters_stay_literal(meta):
    value = f"a{meta}b $(echo pwned)"
    command = render_command("printf '%s\\0' {v}", {"v": value})
    out = subprocess.run(
        ["/bin/sh", "-c", command], capture_output=True, check=True, timeout=5
    ).stdout.decode()
    assert out.split("\0")[:-1] == [value]


@pytest.mark.parametrize(
    ("template", "values", "named"),
    [
        ("ls {path}", {}, "{path}"),
        ("ls {path}", {"pathx": "/"}, "{path}"),
        ("echo {}", {"": "x"}, "{}"),
        ("echo {0}", {"0": "x"}, "{0}"),
        ("echo {a.b}", {"a": "x"}, "{a.b}"),
        ("echo {a[0]}", {"a": "x"}, "{a[0]}"),
        ("echo {a!r}", {"a": "x"}, "{a}"),
        ("echo {a:>10}", {"a": "x"}, "{a}"),
    ],
)
def test_render_command_refuses_placeholders(template, values, named):
    with pytest.raises(UnsafeValueError) as err:
        render_command(template, values)
    assert named in str(err.value)


@pytest.mark.parametrize("template", ["echo {", "echo }", "echo {a"])
def test_render_command_refuses_malformed_template(template):
    with pytest.raises(UnsafeValueError):
        render_command(template, {"a": "x"})


def test_render_command_refuses_unquotable_value():
    with pytest.raises(UnsafeValueError):
        render_command("echo {a}", {"a": "x\x00y"})


@pytest.mark.parametrize(
    ("template", "where"),
    [
        ("sh -c 'echo {x}'", "inside ' quotes"),
        ('sh -c "echo {x}"', 'inside " quotes'),
        ('echo "$(date)" "{x}"', 'inside " quotes'),
        ("echo \\{x}", "after a backslash"),
        ("echo 'a' \"b {x}\"", 'inside " quotes'),
        ('echo "it\'s {x}"', 'inside " quotes'),
    ],
)
def test_render_command_refuses_a_quoted_placeholder(template, where):
    with pytest.raises(UnsafeValueError) as err:
        render_command(template, {"x": "a; id"})
    assert "{x}" in str(err.value) and where in str(err.value)


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("sh -c 'echo \"$1\"' sh {x}", ["sh", "-c", 'echo "$1"', "sh", "a; id"]),
        ("echo 'it''s' {x}", ["echo", "its", "a; id"]),
        ('echo "q" \\\' {x}/c', ["echo", "q", "'", "a; id/c"]),
        ('echo "a\\"b" {x}', ["echo", 'a"b', "a; id"]),
        ('echo "$(printf %s {x})"', ["echo", "a; id"]),
        ("echo `printf %s {x}`", ["echo", "a;", "id"]),
    ],
)
def test_render_command_outside_quotes_stays_one_word(template, words):
    rendered = render_command(template, {"x": "a; id"})
    assert _sh_echo_args(rendered.split(" ", 1)[1]) == words[1:]


def test_check_command_template_names_placeholders():
    from kmpops.shellsafe import check_command_template

    assert check_command_template("{deploy_path}/control restart --port {web_port}") == [
        "deploy_path",
        "web_port",
    ]
    with pytest.raises(UnsafeValueError, match=r"\{address\}"):
        check_command_template("sh -c 'block {address}'")


@pytest.mark.parametrize("value", ["/srv/h1", "/", "/a/b.c"])
def test_validate_absolute_path_accepts(value):
    from kmpops.shellsafe import validate_absolute_path

    assert validate_absolute_path(value, what="root") == value


@pytest.mark.parametrize("value", ["-delete", "srv/h1", "/srv/../etc", "/srv/$(id)", "/a/-x", ""])
def test_validate_absolute_path_refuses(value):
    from kmpops.shellsafe import validate_absolute_path

    with pytest.raises(UnsafeValueError, match="root"):
        validate_absolute_path(value, what="root")
