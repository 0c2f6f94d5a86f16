"""Settings: one frozen dataclass, loaded once from flags, environment, `.env` and defaults.

`load(argv, environ)` is a pure function of its inputs (plus the files the settings name): it
never touches `os.environ`, and it reports every problem at once, each naming the setting, the
value that came in and what to change, so a user fixes a broken configuration in one go.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from yarl import URL

from . import __version__

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
COMMANDS = ("run", "check")
ENV_PREFIX = "SQUIRRO_PROXY_"
# Loud on purpose: the flag lets anyone who can reach the port act as the user.
PUBLIC_BIND_OPT_OUT = "--insecure-public-bind"


class Secret:
    """A string that never shows itself in `repr`, `str` or f-strings by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ConfigError(Exception):
    """Every problem found in the configuration, each a line saying what to change."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy needs to run, validated."""

    cluster: URL
    token: Secret | None = field(default=None, repr=False)
    token_file: Path | None = None
    command: str = "run"
    host: str = "127.0.0.1"
    port: int = 8080
    unix_socket: Path | None = None
    # False when only the Unix socket serves (--unix-socket without an explicit --host/--port).
    listen_tcp: bool = True
    token_lifetime: float = 600.0
    log_level: str = "info"
    log_format: str = "text"
    demo: bool = False
    retry_body_limit: int = 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    pool_size: int = 100
    shutdown_grace: float = 10.0
    # Processes serving requests; above 1 a supervisor holds the token for all (supervisor.py).
    workers: int = 1
    client_id: str | None = None
    client_secret: Secret | None = field(default=None, repr=False)
    tenant: str | None = None
    # Safety (see guard.py)
    client_token: Secret | None = field(default=None, repr=False)
    client_token_file: Path | None = None
    allow_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    insecure_public_bind: bool = False
    read_only: bool = False
    allow_paths: tuple[str, ...] = ()
    deny_paths: tuple[str, ...] = ()
    forward_cookies: bool = False
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 100
    header_timeout: float = 10.0
    # Upstream TLS
    ca_bundle: Path | None = None
    insecure: bool = False
    # Start-up warnings the CLI logs every time (risky choices the user made on purpose).
    notices: tuple[str, ...] = ()

    @property
    def is_loopback_bind(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the option table -------------------------------------------------------------------------
# One row per setting: the flag, the variable, how to parse it and the help text. argparse, the
# environment and the .env file are all read through this table, so the three cannot drift apart.


@dataclass(frozen=True)
class Option:
    name: str
    flag: str
    env: str | None
    parse: Callable[[str], Any]
    help: str
    default: Any = None
    kind: str = "value"  # value | bool | list
    metavar: str | None = None
    hint: str = ""


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip().replace("_", ""))
        if not lo <= value <= hi:
            raise ValueError
        return value

    parse.__doc__ = f"a whole number from {lo} to {hi}"
    return parse


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError
    return value


_positive_float.__doc__ = "a number of seconds greater than 0"


def _size(raw: str) -> int:
    text = raw.strip().lower().replace("_", "")
    units = {"kib": 1024, "k": 1024, "mib": 1024**2, "m": 1024**2, "gib": 1024**3, "g": 1024**3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            value = int(float(text[: -len(suffix)]) * factor)
            break
    else:
        value = int(text)
    if value < 0:
        raise ValueError
    return value


_size.__doc__ = "a size in bytes, optionally with a unit (64KiB, 1MiB)"


MAX_WORKERS = 64


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container
    limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to respect
    return max(1, count)


def _workers(raw: str) -> int:
    value = raw.strip().lower()
    if value == "auto":
        return min(MAX_WORKERS, available_cpus())
    return _int_range(1, MAX_WORKERS)(value)


_workers.__doc__ = f"a whole number from 1 to {MAX_WORKERS}, or auto (one per CPU)"


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError
        return value

    parse.__doc__ = "one of " + ", ".join(choices)
    return parse


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


_bool.__doc__ = "true or false (also 1/0, yes/no, on/off)"


def _text(raw: str) -> str:
    if any(c in raw for c in "\r\n\0"):
        # Values end up in headers and log lines: CR/LF would inject new ones.
        raise ValueError
    return raw.strip()


_text.__doc__ = "text without line breaks or NUL"


def _path(raw: str) -> Path:
    return Path(_text(raw)).expanduser()


_path.__doc__ = "a file path"


OPTIONS: tuple[Option, ...] = (
    Option("cluster", "--cluster", "SQUIRRO_CLUSTER", _text,
           "Squirro cluster base URL, e.g. https://squirro.example.com (may carry a path prefix).",
           metavar="URL"),
    Option("token", "--token", "SQUIRRO_TOKEN", _text,
           "Refresh (user) token from 'API Access'. Prefer the variable or --token-file: "
           "command lines are visible to other users in `ps`.", metavar="TOKEN"),
    Option("token_file", "--token-file", "SQUIRRO_TOKEN_FILE", _path,
           "File holding the refresh token (Docker/Kubernetes secrets); re-read when it changes.",
           metavar="PATH"),
    Option("host", "--host", "SQUIRRO_PROXY_HOST", _text,
           "Address to listen on. Non-loopback addresses need a client token.",
           default="127.0.0.1", metavar="ADDR"),
    Option("port", "--port", "SQUIRRO_PROXY_PORT", _int_range(0, 65535),
           "TCP port to listen on; 0 picks a free port.", default=8080, metavar="N"),
    Option("unix_socket", "--unix-socket", "SQUIRRO_PROXY_UNIX_SOCKET", _path,
           "Listen on this Unix socket, created with mode 0600 (only your user can connect), "
           "instead of TCP; set --host or --port as well to listen on both.", metavar="PATH"),
    Option("token_lifetime", "--token-lifetime", "SQUIRRO_PROXY_TOKEN_LIFETIME", _positive_float,
           "Access token lifetime in seconds when the token response has no expires_in.",
           default=600.0, metavar="SECONDS"),
    Option("log_level", "--log-level", "SQUIRRO_PROXY_LOG_LEVEL", _choice(LOG_LEVELS),
           "Log level: " + ", ".join(LOG_LEVELS) + ".", default="info", metavar="LEVEL"),
    Option("log_format", "--log-format", "SQUIRRO_PROXY_LOG_FORMAT", _choice(LOG_FORMATS),
           "Log format: text for people, json for log pipelines.", default="text",
           metavar="FORMAT"),
    Option("demo", "--demo", None, _bool,
           "Start a built-in simulated Squirro cluster and proxy to it.", default=False,
           kind="bool"),
    Option("retry_body_limit", "--retry-body-limit", "SQUIRRO_PROXY_RETRY_BODY_LIMIT", _size,
           "Request bodies up to this size are kept while sent, so they can be replayed after a "
           "401; larger bodies stream without a copy.", default=1024 * 1024, metavar="BYTES"),
    Option("connect_timeout", "--connect-timeout", "SQUIRRO_PROXY_CONNECT_TIMEOUT",
           _positive_float, "Seconds to connect to the cluster before answering 502.",
           default=10.0, metavar="SECONDS"),
    Option("read_timeout", "--read-timeout", "SQUIRRO_PROXY_READ_TIMEOUT", _positive_float,
           "Idle seconds between two reads from the cluster before answering 504 "
           "(no total timeout: streams may last for hours).", default=300.0, metavar="SECONDS"),
    Option("pool_size", "--pool-size", "SQUIRRO_PROXY_POOL_SIZE", _int_range(1, 10_000),
           "Most connections open to the cluster at once.", default=100, metavar="N"),
    Option("shutdown_grace", "--shutdown-grace", "SQUIRRO_PROXY_SHUTDOWN_GRACE", _positive_float,
           "On SIGTERM/SIGINT, seconds in-flight requests get to finish (a request still "
           "under way then gets as long again before it is cancelled).", default=10.0,
           metavar="SECONDS"),
    Option("workers", "--workers", "SQUIRRO_PROXY_WORKERS", _workers,
           "Processes serving requests, sharing one listening socket and one access token "
           "(auto: one per CPU). Above 1, a supervisor process holds the token for all.",
           default=1, metavar="N"),
    Option("client_id", "--client-id", "SQUIRRO_PROXY_CLIENT_ID", _text,
           "OAuth client id sent with the token exchange (optional).", metavar="ID"),
    Option("client_secret", "--client-secret", "SQUIRRO_PROXY_CLIENT_SECRET", _text,
           "OAuth client secret sent with the token exchange (optional).", metavar="SECRET"),
    Option("tenant", "--tenant", "SQUIRRO_PROXY_TENANT", _text,
           "Tenant sent with the token exchange (optional).", metavar="TENANT"),
    Option("client_token", "--client-token", "SQUIRRO_PROXY_CLIENT_TOKEN", _text,
           "Require this token from clients (Bearer, or the password of Basic auth).",
           metavar="TOKEN"),
    Option("client_token_file", "--client-token-file", "SQUIRRO_PROXY_CLIENT_TOKEN_FILE", _path,
           "File holding the client token.", metavar="PATH"),
    Option("allow_hosts", "--allow-host", "SQUIRRO_PROXY_ALLOW_HOSTS", _text,
           "Also accept requests with this Host name (repeatable; the variable takes a comma "
           "list). Loopback names are always accepted.", default=(), kind="list", metavar="NAME"),
    Option("cors_origins", "--cors-origin", "SQUIRRO_PROXY_CORS_ORIGINS", _text,
           "Let pages from this origin call the API through the proxy, e.g. "
           "http://localhost:3000 (repeatable; the variable takes a comma list).",
           default=(), kind="list", metavar="ORIGIN"),
    Option("insecure_public_bind", PUBLIC_BIND_OPT_OUT, "SQUIRRO_PROXY_INSECURE_PUBLIC_BIND",
           _bool, "Allow a non-loopback --host without a client token: anyone who reaches the "
           "port acts as you on Squirro.", default=False, kind="bool"),
    Option("read_only", "--read-only", "SQUIRRO_PROXY_READ_ONLY", _bool,
           "Forward only GET, HEAD and OPTIONS; other methods get 405.", default=False,
           kind="bool"),
    Option("allow_paths", "--allow-path", "SQUIRRO_PROXY_ALLOW_PATHS", _text,
           "Forward only paths under this prefix (repeatable; comma list in the variable).",
           default=(), kind="list", metavar="PREFIX"),
    Option("deny_paths", "--deny-path", "SQUIRRO_PROXY_DENY_PATHS", _text,
           "Refuse paths under this prefix with 403 (repeatable; comma list in the variable).",
           default=(), kind="list", metavar="PREFIX"),
    Option("forward_cookies", "--forward-cookies", "SQUIRRO_PROXY_FORWARD_COOKIES", _bool,
           "Pass Cookie and Set-Cookie headers through (off: browsers send every localhost "
           "cookie to the proxy, which must not leak them to the cluster).", default=False,
           kind="bool"),
    Option("max_line_size", "--max-line-size", "SQUIRRO_PROXY_MAX_LINE_SIZE",
           _int_range(256, 1024 * 1024), "Longest request line accepted (bytes).",
           default=8190, metavar="BYTES"),
    Option("max_field_size", "--max-field-size", "SQUIRRO_PROXY_MAX_FIELD_SIZE",
           _int_range(256, 1024 * 1024), "Longest single header accepted (bytes).",
           default=8190, metavar="BYTES"),
    Option("max_headers", "--max-headers", "SQUIRRO_PROXY_MAX_HEADERS", _int_range(8, 10_000),
           "Most request headers accepted.", default=100, metavar="N"),
    Option("header_timeout", "--header-timeout", "SQUIRRO_PROXY_HEADER_TIMEOUT",
           _positive_float, "Seconds a client gets to send its request headers.",
           default=10.0, metavar="SECONDS"),
    Option("ca_bundle", "--ca-bundle", "SQUIRRO_PROXY_CA_BUNDLE", _path,
           "CA certificates (PEM) to verify the cluster with (private CAs).", metavar="PATH"),
    Option("insecure", "--insecure", "SQUIRRO_PROXY_INSECURE", _bool,
           "Do not verify the cluster's TLS certificate (warned at every start).",
           default=False, kind="bool"),
)
_BY_NAME = {o.name: o for o in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squirro-proxy",
        description=(
            "Local authenticating reverse proxy for the Squirro API. It exchanges your "
            "refresh (user) token for short-lived access tokens, keeps them fresh, and "
            "forwards every request to the cluster with 'Authorization: Bearer <token>'."
        ),
        epilog=(
            "Settings come from, highest first: flags, the environment, the .env file, "
            "defaults. Commands: 'run' (default) serves; 'check' validates the settings, "
            "exchanges the token once and prints who the proxy acts as."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="run",
                        help="run (default) or check")
    parser.add_argument("--version", action="version", version=f"squirro-proxy {__version__}")
    parser.add_argument(
        "--env-file", metavar="PATH",
        help="Read settings from this file instead of ./.env (a missing ./.env is fine).",
    )
    for opt in OPTIONS:
        where = f"[env {opt.env}]" if opt.env else ""
        hidden = opt.kind == "bool" or opt.default in (None, ())
        default_text = "" if hidden else f"[default {opt.default}]"
        help_text = " ".join(x for x in (opt.help, where, default_text) if x)
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.name, action="store_const", const="true",
                                help=help_text)
        elif opt.kind == "list":
            parser.add_argument(opt.flag, dest=opt.name, action="append", metavar=opt.metavar,
                                help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, help=help_text)
    return parser


def load(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Build Settings from flags, environment and .env, or raise ConfigError listing every problem.

    argparse usage errors (an unknown flag) raise SystemExit from argparse itself, as usual.
    """
    environ = dict(os.environ if environ is None else environ)
    cwd = cwd or Path.cwd()
    args = vars(build_parser().parse_args(list(argv) if argv is not None else None))
    problems: list[str] = []

    dotenv: dict[str, str] = {}
    env_file = args.pop("env_file", None)
    if env_file is not None:
        env_path = Path(env_file).expanduser()
        if not env_path.is_file():
            problems.append(f"--env-file: {env_file!r} is not a readable file: check the path")
        else:
            dotenv = _read_dotenv(env_path)
    elif (cwd / ".env").is_file():
        dotenv = _read_dotenv(cwd / ".env")

    values: dict[str, Any] = {"command": args.pop("command", None) or "run"}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        raw, source = _lookup(opt, args, environ, dotenv)
        sources[opt.name] = source
        if raw is None:
            values[opt.name] = opt.default
            continue
        try:
            if opt.kind == "list":
                items = raw if isinstance(raw, list) else raw.split(",")
                values[opt.name] = tuple(opt.parse(x) for x in items if x.strip())
            else:
                values[opt.name] = opt.parse(raw)
        except (ValueError, TypeError):
            shown = "<hidden>" if opt.name in _SECRET_NAMES else repr(raw)
            problems.append(
                f"{source}: {shown} is not valid: expected {opt.parse.__doc__ or 'a value'}"
            )
            values[opt.name] = opt.default

    for pair in (("token", "token_file"), ("client_token", "client_token_file")):
        _keep_higher(values, sources, *pair, problems)
    settings_kwargs = _validate(values, problems)
    settings_kwargs["listen_tcp"] = values["unix_socket"] is None or bool(
        sources["host"] or sources["port"]
    )
    settings_kwargs["notices"] = _notices(settings_kwargs, sources)
    if problems:
        raise ConfigError(problems)
    return Settings(**settings_kwargs)


_SECRET_NAMES = {"token", "client_token", "client_secret"}


def _read_dotenv(path: Path) -> dict[str, str]:
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _lookup(
    opt: Option, args: Mapping[str, Any], environ: Mapping[str, str], dotenv: Mapping[str, str]
) -> tuple[Any, str]:
    if opt.name in args:
        return args[opt.name], opt.flag
    if opt.env and opt.env in environ:
        return environ[opt.env], opt.env
    if opt.env and opt.env in dotenv:
        return dotenv[opt.env], f"{opt.env} (in .env)"
    return None, ""


def _read_secret_file(path: Path, what: str, flag: str, problems: list[str]) -> Secret | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{flag}: cannot read {str(path)!r} ({exc.strerror}): check the path "
                        f"and that the proxy's user may read it")
        return None
    if not text:
        problems.append(f"{flag}: {str(path)!r} is empty: put the {what} in it")
        return None
    if any(c in text for c in "\r\n\0 "):
        problems.append(f"{flag}: {str(path)!r} holds more than one line or spaces: it must "
                        f"hold only the {what}")
        return None
    return Secret(text)


def _level(source: str) -> int:
    """Precedence of where a value came from: flags, then the environment, then .env."""
    if source.startswith("--"):
        return 0
    return 2 if source.endswith("(in .env)") else 1


def _keep_higher(values: dict[str, Any], sources: Mapping[str, str], a: str, b: str,
                 problems: list[str]) -> None:
    """A token and its file are alternatives: the one from the higher source wins (a
    --token-file flag beats SQUIRRO_TOKEN in the environment); from the same level, both set
    is a mistake worth stopping for."""
    if values[a] is None or values[b] is None:
        return
    level_a, level_b = _level(sources[a]), _level(sources[b])
    if level_a == level_b:
        problems.append(f"{sources[a]} and {sources[b]} are both set: keep one")
    values[b if level_a < level_b else a] = None


def _validate(values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    out = dict(values)
    demo = bool(values["demo"])

    # cluster
    cluster_raw = values["cluster"]
    if demo:
        # The demo cluster's URL is only known once it listens; cli.py fills it in.
        out["cluster"] = URL(cluster_raw) if cluster_raw else URL("http://127.0.0.1:0")
    elif not cluster_raw:
        problems.append("SQUIRRO_CLUSTER / --cluster: missing: set it to your cluster's URL, "
                        "e.g. https://squirro.example.com (or try --demo)")
        out["cluster"] = URL("http://invalid")
    else:
        out["cluster"] = _parse_cluster(cluster_raw, problems)

    # refresh token
    token_opt, file_opt = _BY_NAME["token"], _BY_NAME["token_file"]
    if values["token"] is not None and values["token_file"] is not None:
        pass  # reported by _keep_higher
    elif values["token_file"] is not None:
        out["token"] = _read_secret_file(values["token_file"], "refresh token",
                                         file_opt.flag, problems)
    elif values["token"]:
        if any(c.isspace() for c in values["token"]):
            problems.append(f"{token_opt.flag} / {token_opt.env}: the token contains spaces: "
                            "paste the user token from 'API Access' exactly")
        out["token"] = Secret(values["token"])
    elif not demo:
        problems.append(f"{token_opt.env} / {token_opt.flag}: missing: create a user token under "
                        "'API Access' in Squirro and set SQUIRRO_TOKEN (or SQUIRRO_TOKEN_FILE)")
        out["token"] = None
    else:
        out["token"] = None

    if values["client_secret"] is not None:
        out["client_secret"] = Secret(values["client_secret"])

    # client token
    if values["client_token"] is not None and values["client_token_file"] is not None:
        pass  # reported by _keep_higher
    elif values["client_token_file"] is not None:
        out["client_token"] = _read_secret_file(values["client_token_file"], "client token",
                                                "--client-token-file", problems)
    elif values["client_token"] is not None:
        if len(values["client_token"]) < 16 or any(c.isspace() for c in values["client_token"]):
            problems.append("--client-token / SQUIRRO_PROXY_CLIENT_TOKEN: too short or has "
                            "spaces: use at least 16 characters, e.g. from "
                            "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
        out["client_token"] = Secret(values["client_token"])

    # where to listen
    host = values["host"]
    if not host:
        problems.append("--host / SQUIRRO_PROXY_HOST: empty: use 127.0.0.1 (the default)")
    elif not _is_bindable_host(host):
        problems.append(f"--host / SQUIRRO_PROXY_HOST: {host!r} is neither an IP address nor "
                        "a name: use 127.0.0.1 (the default), ::1 or an address of this machine")
    elif (
        not is_loopback_host(host)
        and out.get("client_token") is None
        and not values["insecure_public_bind"]
    ):
        problems.append(
            f"--host {host}: listening beyond loopback lets anyone who reaches the port act as "
            "you on Squirro: also set a client token (--client-token-file or "
            f"SQUIRRO_PROXY_CLIENT_TOKEN), or, if a network policy protects the port, "
            f"opt out with {PUBLIC_BIND_OPT_OUT}"
        )

    for name in ("allow_paths", "deny_paths"):
        for prefix in values[name]:
            if not prefix.startswith("/"):
                flag = _BY_NAME[name].flag
                problems.append(f"{flag}: {prefix!r} must start with '/', e.g. /api/topic/")
    out["cors_origins"] = tuple(_check_origin(o, problems) for o in values["cors_origins"])
    out["allow_hosts"] = tuple(h.lower() for h in values["allow_hosts"])

    if values["ca_bundle"] is not None and not Path(values["ca_bundle"]).is_file():
        problems.append(f"--ca-bundle / SQUIRRO_PROXY_CA_BUNDLE: {str(values['ca_bundle'])!r} "
                        "is not a readable file: point it at a PEM file of CA certificates")
    if values["ca_bundle"] is not None and values["insecure"]:
        problems.append("--ca-bundle and --insecure are both set: keep one")
    if values["unix_socket"] is not None and not Path(values["unix_socket"]).parent.is_dir():
        problems.append(f"--unix-socket: the folder of {str(values['unix_socket'])!r} does "
                        "not exist: create it or choose another path")
    return out


def _notices(values: Mapping[str, Any], sources: Mapping[str, str]) -> tuple[str, ...]:
    notices = []
    for name in ("token", "client_token", "client_secret"):
        if sources.get(name, "").startswith("--"):
            notices.append(
                f"{sources[name]} was given on the command line, where other users of this "
                f"machine can read it (ps, /proc): prefer {_BY_NAME[name].env}, the .env file "
                "or a token file"
            )
    if values["insecure"]:
        notices.append("--insecure: the cluster's TLS certificate is NOT verified; anyone "
                       "between this machine and the cluster can read the tokens")
    if not is_loopback_host(values["host"]) and values.get("client_token") is None:
        notices.append(
            f"{PUBLIC_BIND_OPT_OUT}: listening on {values['host']} without a client token: "
            "anyone who can reach this port acts as you on Squirro"
        )
    return tuple(notices)


def _parse_cluster(raw: str, problems: list[str]) -> URL:
    try:
        url = URL(raw)
    except ValueError:
        url = None
    # A password in the URL must not be echoed back in the error (it lands in terminals and CI
    # logs): quote the URL without its user info.
    shown = repr(str(url.with_user(None))) if url is not None and url.user else repr(raw)
    if url is None or url.scheme not in ("http", "https") or not url.host:
        problems.append(
            f"SQUIRRO_CLUSTER / --cluster: {shown} is not an http(s) URL: use the address you "
            "open Squirro at, e.g. https://squirro.example.com"
        )
        return URL("http://invalid")
    if url.query_string or url.fragment or url.user or url.password:
        problems.append(
            f"SQUIRRO_CLUSTER / --cluster: {shown} carries a query, fragment or user info: "
            "give only scheme, host, optional port and path prefix"
        )
    # Normalise the prefix to no trailing slash: request paths start with '/'.
    path = url.raw_path.rstrip("/")
    return url.with_path(path or "", encoded=True).with_query(None).with_fragment(None)


def _check_origin(raw: str, problems: list[str]) -> str:
    try:
        url = URL(raw)
    except ValueError:
        url = None
    if (
        url is None
        or url.scheme not in ("http", "https")
        or not url.host
        or url.raw_path not in ("", "/")
        or url.query_string
    ):
        problems.append(f"--cors-origin: {raw!r} is not an origin: write scheme://host[:port], "
                        "e.g. http://localhost:3000")
        return raw
    return str(url.origin())


def _is_bindable_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True
