import re
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from session_lens.config import (
    SETTINGS,
    Address,
    ConfigError,
    describe,
    load_config,
    mask_url,
    parse_duration,
    read_file,
)
from session_lens.evidence.questdb import configured

UP = {"upstream": "http://127.0.0.1:8000"}


def problems(**sources: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(**sources)  # type: ignore[arg-type]
    return [str(p) for p in caught.value.problems]


def test_defaults() -> None:
    config = load_config(flags=UP)
    assert config.listen == Address("127.0.0.1", 8080)
    assert config.admin_listen == Address("127.0.0.1", 9464)
    assert config.validation == "enforce"
    assert config.invalid_status == 404
    assert config.session_routes == ("/api/sessions/{session_id}", "/sessions/{session_id}")
    assert config.max_future_skew == timedelta(hours=24)
    assert config.shutdown_grace == timedelta(seconds=10)
    assert config.database_url is None
    assert config.sources["listen"] == "default"


def test_flag_beats_env_beats_file() -> None:
    file = {
        "upstream": "http://file:1",
        "listen": "127.0.0.1:1001",
        "admin_listen": "127.0.0.1:1002",
        "validation": "observe",
    }
    environ = {
        "SESSION_LENS_LISTEN": "127.0.0.1:2001",
        "SESSION_LENS_ADMIN_LISTEN": "127.0.0.1:2002",
    }
    flags = {"admin_listen": "127.0.0.1:3002", "listen": None}
    config = load_config(file=file, file_name="file c.toml", environ=environ, flags=flags)
    assert config.upstream == "http://file:1"
    assert config.validation == "observe"
    assert config.listen.port == 2001
    assert config.admin_listen.port == 3002
    assert config.sources["upstream"] == "file c.toml"
    assert config.sources["listen"] == "env SESSION_LENS_LISTEN"
    assert config.sources["admin_listen"] == "flag --admin-listen"


def test_toml_types_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'upstream = "http://127.0.0.1:8000/"\ninvalid_status = 422\nmax_future_skew = 60\n'
        'session_routes = ["/v2/s/{session_id}"]\nupstream_read_timeout = "1m30s"\n'
    )
    config = load_config(file=read_file(path))
    assert config.upstream == "http://127.0.0.1:8000"  # trailing slash folded
    assert config.invalid_status == 422
    assert config.max_future_skew == timedelta(seconds=60)
    assert config.session_routes == ("/v2/s/{session_id}",)
    assert config.upstream_read_timeout == timedelta(seconds=90)


def test_env_lists_are_comma_separated() -> None:
    config = load_config(
        environ={
            "SESSION_LENS_UPSTREAM": "http://u:1",
            "SESSION_LENS_SESSION_ROUTES": "/a/{session_id}, /b/{session_id}",
        }
    )
    assert config.session_routes == ("/a/{session_id}", "/b/{session_id}")


def test_unknown_env_variables_are_left_alone() -> None:
    # Kubernetes injects SESSION_LENS_PORT and friends for a service of that name.
    config = load_config(
        environ={"SESSION_LENS_UPSTREAM": "http://u:1", "SESSION_LENS_PORT": "tcp://10.0.0.1:8080"}
    )
    assert config.listen.port == 8080


def test_upstream_is_required() -> None:
    assert problems(flags={}) == [
        "upstream: is required: --upstream or SESSION_LENS_UPSTREAM (from nowhere)"
    ]


def test_every_problem_is_reported_once_with_its_source() -> None:
    found = problems(
        file={"upstreem": "x", "listen": "nowhere", "upstream": "http://u:1"},
        file_name="file s.toml",
        environ={
            "SESSION_LENS_ADMIN_LISTEN": "127.0.0.1:70000",
            "SESSION_LENS_UPSTREAM_CONNECT_TIMEOUT": "soon",
        },
        flags={"invalid_status": "500", "validation": "strict", "database_url": "mysql://db/x"},
    )
    assert sorted(found) == sorted(
        [
            "upstreem: unknown setting; did you mean upstream? (from file s.toml)",
            "listen: 'nowhere' is not host:port (e.g. 127.0.0.1:8080) (from file s.toml)",
            "admin_listen: port 70000 is out of range (1-65535) "
            "(from env SESSION_LENS_ADMIN_LISTEN)",
            "upstream_connect_timeout: 'soon' is not a duration (e.g. 500ms, 30s, 5m) "
            "(from env SESSION_LENS_UPSTREAM_CONNECT_TIMEOUT)",
            "database_url: 'mysql://db/x' must start with postgres:// or postgresql:// "
            "(from flag --database-url)",
            "validation: 'strict' is not one of enforce, observe (from flag --validation)",
            "invalid_status: '500' is not one of 400, 404, 422 (from flag --invalid-status)",
        ]
    )


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("upstream", "ftp://x", "must start with http:// or https://"),
        ("upstream", "http://", "has no host"),
        ("upstream", "http://h:99999", "is not a valid URL"),
        ("upstream", "http://h/?q=1", "must not have a query or fragment"),
        ("upstream", "http://a..b:80", "has a host name with an empty label"),
        ("database_url", f"postgresql://{'h' * 64}.example/x", "one over 63 characters"),
        ("listen", "127.0.0.1:0", "port 0 is out of range"),
        ("listen", "[::1]8080", "is not host:port"),
        ("shutdown_grace", "-1s", "is not a duration"),
        ("shutdown_grace", "400d", "is not a duration"),
        ("upstream_read_timeout", "0", "must be longer than zero"),
        ("session_routes", "/api/sessions", "needs exactly one {session_id} placeholder"),
        ("session_routes", ",", "needs at least one path template"),
        ("log_level", "loud", "is not one of debug, info, warning, error"),
        ("upstream_ca_file", "/nonexistent/ca.pem", "cannot be read as PEM certificates"),
        ("upstream_ca_file", __file__, "cannot be read as PEM certificates"),
        ("workers", "\u0662", "is not a whole number"),  # an Arabic-Indic 2
        ("max_connections", "\uff11\uff10", "is not a whole number"),  # fullwidth 10
        ("listen", "127.0.0.1:\u0668\u0660\u0668\u0660", "is not host:port"),
        ("invalid_status", "\u0664\u0660\u0664", "is not one of 400, 404, 422"),
        ("shutdown_grace", "\u0665", "is not a duration"),
    ],
)
def test_bad_values(setting: str, value: str, message: str) -> None:
    [found] = problems(flags={**UP, setting: value})
    assert found.startswith(f"{setting}: ")
    assert message in found
    assert found.endswith(f"(from flag --{setting.replace('_', '-')})")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5", 1.5), (2, 2), (0.5, 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_values_of_the_wrong_kind_in_a_file_are_refused() -> None:
    found = problems(
        file={
            "upstream": "http://u:1",
            "admin_token": ["SECRETSECRETSECRET1"],
            "database_url": ["postgresql://u:p@h/db"],
            "listen": {"host": "x"},
        },
        file_name="file s.toml",
    )
    assert sorted(found) == [
        "admin_token: is not a usable token: is an array; a single value is expected"
        " (from file s.toml)",
        "database_url: is an array; a single value is expected (from file s.toml)",
        "listen: is a table; a single value is expected (from file s.toml)",
    ]
    [found] = problems(file={"upstream": "http://u:1", "admin_token": 12345678901234567890})
    assert found.startswith("admin_token: is not a usable token: must be a string")


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://lens:s3cret@db:5432/x") == "postgresql://lens:***@db:5432/x"
    assert mask_url("postgresql://db/x") == "postgresql://db/x"
    assert mask_url("postgresql://u@h/db?sslmode=require&password=s3cret") == (
        "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert "s#cr/t" not in mask_url("postgresql://u:s#cr/t@h:99999/db")
    # libpq's keyword/value form, as an error shows a value that is not a URL
    assert mask_url("host=db password=HUNTER2 user=lens") == "host=db password=*** user=lens"
    assert "a b" not in mask_url("host=db sslpassword = 'a b' user=x")
    [shown] = problems(flags={**UP, "database_url": "host=db password=HUNTER2 user=lens"})
    assert "HUNTER2" not in shown
    config = load_config(flags={**UP, "database_url": "postgresql://lens:s3cret@db/x"})
    shown = describe(config)
    assert "s3cret" not in shown
    assert 'database_url = "postgresql://lens:***@db/x"' in shown


def test_password_never_echoed_in_errors() -> None:
    [found] = problems(flags={**UP, "database_url": "mysql://lens:s3cret@db/x"})
    assert "s3cret" not in found


def test_unreadable_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        read_file(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("upstream = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_file(broken)


def test_admin_off_loopback_needs_a_token() -> None:
    [found] = problems(flags={**UP, "admin_listen": "0.0.0.0:9464"})
    assert found == (
        "admin_token: is required when admin_listen (0.0.0.0:9464) is not a loopback address:"
        " set SESSION_LENS_ADMIN_TOKEN (from nowhere)"
    )
    config = load_config(
        flags={**UP, "admin_listen": "0.0.0.0:9464"},
        environ={"SESSION_LENS_ADMIN_TOKEN": "a-secret-of-32-characters-or-so"},
    )
    assert config.admin_token == "a-secret-of-32-characters-or-so"
    assert "a-secret" not in describe(config)
    assert "a-secret" not in repr(config)
    [short] = problems(flags={**UP, "admin_token": "hunter2"})
    assert "hunter2" not in short and short.startswith("admin_token: is not a usable token")


README = Path(__file__).parent.parent / "README.md"


def test_readme_table_lists_every_setting_as_declared() -> None:
    section = README.read_text().split("\n## Configuration\n")[1].split("\n## ")[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    assert [row[0] for row in rows] == [f"`{setting.name}`" for setting in SETTINGS]
    for (_, flag, env, default), setting in zip(rows, SETTINGS, strict=True):
        assert (flag, env) == (f"`{setting.flag}`", f"`{setting.env}`")
        shown = default.replace("`", "")
        # The default comes first, then perhaps a word on it: "`5s`, then 408".
        assert re.match(re.escape(setting.default_text) + r"($|[ ;,])", shown), (
            f"{setting.name}: the README says {default!r}, the default is {setting.default_text!r}"
        )


def test_questdb_pool_size_from_each_source_and_into_the_store() -> None:
    assert load_config(flags=UP).questdb_pool_size == 4
    assert load_config(file={**UP, "questdb_pool_size": 12}).questdb_pool_size == 12
    environ = {"SESSION_LENS_QUESTDB_POOL_SIZE": " 7 "}
    config = load_config(environ=environ, flags={**UP, "questdb_url": "postgresql://q/qdb"})
    assert config.questdb_pool_size == 7
    settings = configured(config)
    assert settings is not None and settings.pool_size == 7
    assert configured(config, pool_size=1) == replace(settings, pool_size=1)


@pytest.mark.parametrize("raw", ["0", "65", "-1", "2.5", "four", "", "٤", True, 8.0])
def test_questdb_pool_size_out_of_bounds_or_not_a_count(raw: object) -> None:
    [env] = problems(environ={"SESSION_LENS_QUESTDB_POOL_SIZE": str(raw)}, flags=UP)
    assert env == (
        f"questdb_pool_size: {str(raw)!r} is not a whole number from 1 to 64"
        " (from env SESSION_LENS_QUESTDB_POOL_SIZE)"
    )
    [file] = problems(file={**UP, "questdb_pool_size": raw}, file_name="file lens.toml")
    assert file == (
        f"questdb_pool_size: {raw!r} is not a whole number from 1 to 64 (from file lens.toml)"
    )
