"""Settings: precedence, the .env file, token files, and every bad value reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from yarl import URL

from proxy.config import OPTIONS, ConfigError, Secret, build_parser, load

BASE = {"SQUIRRO_CLUSTER": "https://sq.example.com", "SQUIRRO_TOKEN": "refresh-abcdef123456"}


def _load(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):  # type: ignore[no-untyped-def]
    return load(argv, BASE if env is None else env, cwd=cwd)


def test_defaults(tmp_path: Path) -> None:
    """With only cluster and token set, the documented defaults apply."""
    s = _load([], cwd=tmp_path)
    assert (s.host, s.port, s.token_lifetime, s.log_level) == ("127.0.0.1", 8080, 600.0, "info")
    assert s.cluster == URL("https://sq.example.com")
    assert s.token == Secret("refresh-abcdef123456")
    assert s.retry_body_limit == 1024 * 1024


def test_precedence_flag_env_dotenv_default(tmp_path: Path) -> None:
    """Flags beat the environment, which beats .env, which beats the defaults."""
    (tmp_path / ".env").write_text(
        "SQUIRRO_PROXY_PORT=7000\nSQUIRRO_PROXY_LOG_LEVEL=debug\nSQUIRRO_PROXY_TOKEN_LIFETIME=99\n"
    )
    env = {**BASE, "SQUIRRO_PROXY_PORT": "7100", "SQUIRRO_PROXY_LOG_LEVEL": "warning"}
    s = load(["--port", "7200"], env, cwd=tmp_path)
    assert s.port == 7200  # flag
    assert s.log_level == "warning"  # environment over .env
    assert s.token_lifetime == 99.0  # .env over default


def test_env_file_flag_and_environ_untouched(tmp_path: Path) -> None:
    """--env-file is read with python-dotenv and never copied into os.environ."""
    import os

    env_file = tmp_path / "custom.env"
    env_file.write_text("SQUIRRO_CLUSTER=https://from-file.example.com/squirro/\n"
                        "SQUIRRO_TOKEN=file-token-123456\n")
    s = load(["--env-file", str(env_file)], {}, cwd=tmp_path)
    assert s.cluster == URL("https://from-file.example.com/squirro")
    assert s.token == Secret("file-token-123456")
    assert "SQUIRRO_TOKEN" not in os.environ or os.environ["SQUIRRO_TOKEN"] != "file-token-123456"


def test_cluster_prefix_kept_without_trailing_slash(tmp_path: Path) -> None:
    """A cluster URL's path prefix is kept, normalised to no trailing slash."""
    s = load([], {**BASE, "SQUIRRO_CLUSTER": "https://h.example.com/squirro/"}, cwd=tmp_path)
    assert str(s.cluster) == "https://h.example.com/squirro"


def test_token_file(tmp_path: Path) -> None:
    """--token-file reads the token (surrounding whitespace and newline trimmed)."""
    f = tmp_path / "token"
    f.write_text("  secret-from-file-123\n")
    env = {"SQUIRRO_CLUSTER": "https://sq.example.com", "SQUIRRO_TOKEN_FILE": str(f)}
    s = load([], env, cwd=tmp_path)
    assert s.token == Secret("secret-from-file-123")
    assert s.token_file == f


def test_secrets_hidden_in_repr(tmp_path: Path) -> None:
    """Neither repr nor str of the settings shows any token."""
    s = load(["--client-token", "client-token-0123456789"], BASE, cwd=tmp_path)
    text = repr(s) + str(s) + repr(s.token) + f"{s.token}"
    assert "refresh-abcdef123456" not in text
    assert "client-token-0123456789" not in text


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {"SQUIRRO_TOKEN": "t-123456"}, "SQUIRRO_CLUSTER / --cluster: missing"),
        ([], {"SQUIRRO_CLUSTER": "https://x.example"}, "SQUIRRO_TOKEN / --token: missing"),
        (["--cluster", "ftp://x"], {"SQUIRRO_TOKEN": "t-123456"}, "is not an http(s) URL"),
        (["--cluster", "squirro.example.com"], {"SQUIRRO_TOKEN": "t-123456"},
         "is not an http(s) URL"),
        (["--cluster", "https://x.example/?a=1"], {"SQUIRRO_TOKEN": "t-123456"},
         "carries a query"),
        (["--port", "http"], BASE, "--port: 'http' is not valid: expected a whole number"),
        (["--port", "70000"], BASE, "from 0 to 65535"),
        ([], {**BASE, "SQUIRRO_PROXY_PORT": "-1"}, "SQUIRRO_PROXY_PORT: '-1' is not valid"),
        (["--token-lifetime", "0"], BASE, "greater than 0"),
        (["--token-lifetime", "nan"], BASE, "greater than 0"),
        (["--log-level", "loud"], BASE, "one of debug, info, warning, error"),
        (["--log-format", "xml"], BASE, "one of text, json"),
        (["--retry-body-limit", "lots"], BASE, "a size in bytes"),
        (["--host", "0.0.0.0"], BASE, "also set a client token"),
        (["--host", "no such host name.invalid"], BASE, "neither an IP address nor a name"),
        (["--token-file", "/nonexistent/token"], {"SQUIRRO_CLUSTER": "https://x.example"},
         "cannot read '/nonexistent/token'"),
        (["--token", "a b"], {"SQUIRRO_CLUSTER": "https://x.example"}, "contains spaces"),
        (["--token-file", "/etc/hostname", "--token", "t-1234567"], BASE, "are both set: keep one"),
        (["--client-token", "short"], BASE, "too short"),
        (["--cors-origin", "localhost:3000"], BASE, "is not an origin"),
        (["--cors-origin", "http://localhost:3000/app"], BASE, "is not an origin"),
        (["--allow-path", "api/topic"], BASE, "must start with '/'"),
        (["--ca-bundle", "/nonexistent.pem"], BASE, "is not a readable file"),
        (["--env-file", "/nonexistent.env"], BASE, "--env-file: '/nonexistent.env'"),
        (["--unix-socket", "/nonexistent/dir/p.sock"], BASE, "does not exist"),
        ([], {**BASE, "SQUIRRO_PROXY_READ_ONLY": "maybe"}, "true or false"),
        ([], {**BASE, "SQUIRRO_PROXY_HOST": "127.0.0.1\r\nX-Injected: 1"}, "without line breaks"),
    ],
)
def test_bad_settings_table(
    argv: list[str], env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    """Each bad setting is named, with the value that came in and what to do."""
    with pytest.raises(ConfigError) as info:
        load(argv, env, cwd=tmp_path)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    """Several bad settings produce one error listing all of them."""
    with pytest.raises(ConfigError) as info:
        load(["--port", "x", "--log-level", "y", "--token-lifetime", "-3"], {}, cwd=tmp_path)
    assert len(info.value.problems) == 5  # port, log level, lifetime, cluster, token


def test_bad_secret_value_not_echoed(tmp_path: Path) -> None:
    """A problem with a token never repeats the token itself."""
    with pytest.raises(ConfigError) as info:
        load(["--client-token", "abc def"], BASE, cwd=tmp_path)
    assert "abc def" not in str(info.value)


def test_public_bind_allowed_with_client_token_or_opt_out(tmp_path: Path) -> None:
    """0.0.0.0 is accepted with a client token, or with the loud opt-out (and a warning)."""
    with_token = load(["--host", "0.0.0.0", "--client-token", "c" * 24], BASE, cwd=tmp_path)
    assert with_token.host == "0.0.0.0"
    assert not any("anyone" in n for n in with_token.notices)
    opted = load(["--host", "0.0.0.0", "--insecure-public-bind"], BASE, cwd=tmp_path)
    assert any("anyone who can reach this port" in n for n in opted.notices)


def test_token_on_command_line_warns(tmp_path: Path) -> None:
    """--token on the command line produces a start-up notice about ps."""
    s = load(["--token", "cli-token-123456"], {"SQUIRRO_CLUSTER": "https://x.example"},
             cwd=tmp_path)
    assert any("ps" in n and "SQUIRRO_TOKEN" in n for n in s.notices)
    assert not any("cli-token-123456" in n for n in s.notices)


def test_list_settings_from_flags_and_env(tmp_path: Path) -> None:
    """Repeatable flags and comma-separated variables give the same lists."""
    a = load(["--allow-host", "proxy", "--allow-host", "Sidecar.local"], BASE, cwd=tmp_path)
    b = load([], {**BASE, "SQUIRRO_PROXY_ALLOW_HOSTS": "proxy, Sidecar.local"}, cwd=tmp_path)
    assert a.allow_hosts == b.allow_hosts == ("proxy", "sidecar.local")


def test_demo_needs_neither_cluster_nor_token(tmp_path: Path) -> None:
    """--demo runs without SQUIRRO_CLUSTER and SQUIRRO_TOKEN."""
    s = load(["--demo"], {}, cwd=tmp_path)
    assert s.demo and s.token is None


def test_help_names_every_setting_variable_and_default() -> None:
    """--help lists each flag with its variable and its default."""
    text = " ".join(build_parser().format_help().split())
    for opt in OPTIONS:
        assert opt.flag in text
        if opt.env:
            assert f"[env {opt.env}]" in text
    assert "[default 8080]" in text and "[default 127.0.0.1]" in text
    assert "[default 600.0]" in text


def test_readme_documents_every_setting() -> None:
    """The README's configuration table names every flag and variable (no drift)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for opt in OPTIONS:
        assert f"`{opt.flag}" in readme, opt.flag
        if opt.env:
            assert f"`{opt.env}`" in readme, opt.env


def test_password_in_cluster_url_not_echoed(tmp_path: Path) -> None:
    """A cluster URL with user info is refused without repeating its password."""
    with pytest.raises(ConfigError) as info:
        load(["--cluster", "https://svc:Hunter2-s3cret@sq.example.com"],
             {"SQUIRRO_TOKEN": "t-123456"}, cwd=tmp_path)
    assert "carries a query, fragment or user info" in str(info.value)
    assert "Hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        # A flag beats the environment, for the token as for every setting.
        (["--token-file", "{file}"], {"SQUIRRO_TOKEN": "env-token-123456"}, "file-token-123456"),
        (["--token", "flag-token-123456"], {"SQUIRRO_TOKEN_FILE": "{file}"}, "flag-token-123456"),
        ([], {"SQUIRRO_TOKEN_FILE": "{file}"}, "file-token-123456"),
    ],
)
def test_token_and_token_file_follow_precedence(
    tmp_path: Path, argv: list[str], env: dict[str, str], expected: str
) -> None:
    """Token and token file from different levels: the higher one wins, no error."""
    f = tmp_path / "token"
    f.write_text("file-token-123456\n")
    argv = [a.replace("{file}", str(f)) for a in argv]
    env = {"SQUIRRO_CLUSTER": "https://x.example",
           **{k: v.replace("{file}", str(f)) for k, v in env.items()}}
    assert load(argv, env, cwd=tmp_path).token == Secret(expected)


def test_token_and_token_file_from_the_same_level_is_an_error(tmp_path: Path) -> None:
    """Both in the environment: ambiguous, so start-up stops and names both."""
    f = tmp_path / "token"
    f.write_text("file-token-123456\n")
    env = {"SQUIRRO_CLUSTER": "https://x.example", "SQUIRRO_TOKEN": "env-token-123456",
           "SQUIRRO_TOKEN_FILE": str(f)}
    with pytest.raises(ConfigError) as info:
        load([], env, cwd=tmp_path)
    assert "SQUIRRO_TOKEN and SQUIRRO_TOKEN_FILE are both set: keep one" in str(info.value)
