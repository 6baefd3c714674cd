"""Configuration: a TOML file, overridden by `SESSION_LENS_*` variables, overridden by flags.

`load_config` takes every source as a plain mapping, so callers (and tests) pass
what they have instead of patching the process. Every problem is collected and
raised at once as a `ConfigError`, each naming the setting and where its value
came from.
"""

import ipaddress
import json
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, timedelta, tzinfo
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .retention import Period, StoreRetention, Unit
from .routes import (
    DEFAULT_LIFECYCLE_ROUTES,
    LifecycleRoute,
    TemplateError,
    compile_template,
    parse_lifecycle_route,
)

ENV_PREFIX = "SESSION_LENS_"


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can reach it."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


DEFAULT_ADMIN_LISTEN = Address("127.0.0.1", 9464)


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration of one session-lens process."""

    upstream: str = ""
    listen: Address = Address("127.0.0.1", 8080)
    admin_listen: Address = DEFAULT_ADMIN_LISTEN
    database_url: str | None = None
    validation: str = "enforce"
    invalid_status: int = 404
    session_routes: tuple[str, ...] = ("/api/sessions/{session_id}", "/sessions/{session_id}")
    max_future_skew: timedelta = timedelta(hours=24)
    id_timezone: tzinfo = UTC
    """The zone the IDs' timestamps are written in."""
    upstream_connect_timeout: timedelta = timedelta(seconds=5)
    upstream_read_timeout: timedelta = timedelta(seconds=60)
    upstream_ca_file: Path | None = None
    """A PEM bundle trusted for an https upstream; None: the system's."""
    header_read_timeout: timedelta = timedelta(seconds=30)
    send_timeout: timedelta = timedelta(seconds=60)
    """How long a client may take nothing of an answer before its connection is closed."""
    lingering_timeout: timedelta = timedelta(seconds=5)
    """How long a connection closed before its request was all read goes on reading."""
    max_connections: int = 10000
    workers: int = 1
    shutdown_grace: timedelta = timedelta(seconds=10)
    log_level: str = "info"
    data_dir: Path = field(default_factory=lambda: default_data_dir())
    sessions_table: str = "sessions"
    sessions_id_column: str = "id"
    backfill_state: str = "'ACTIVE'"
    miss_statuses: tuple[int, ...] = (404,)
    not_found_body: str = "merge"
    visibility_window: timedelta = timedelta(seconds=5)
    creation_timeout: timedelta = timedelta(seconds=30)
    classification_budget: timedelta = timedelta(milliseconds=50)
    upstream_retention: Period | None = None
    """The service's store's own TTL; None: it keeps everything."""
    upstream_partition: Unit = Unit.DAY
    lifecycle_source: str = "database"
    lifecycle_routes: tuple[LifecycleRoute, ...] = DEFAULT_LIFECYCLE_ROUTES
    spool_dir: Path | None = None
    """Where observed events wait for the database; None: `data_dir`/spool."""
    spool_max_bytes: int = 256 << 20
    max_body_bytes: int | None = None
    """Request bodies larger than this are refused with 413; None: no limit."""
    exemplars: bool = True
    """Whether metrics carry the session and request IDs of misses as exemplars."""
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token the admin listener asks for; required off loopback."""

    @property
    def store_retention(self) -> StoreRetention | None:
        """The store's retention in effect, if it has one."""
        if self.upstream_retention is None:
            return None
        return StoreRetention(self.upstream_retention, self.upstream_partition)

    @property
    def spool_path(self) -> Path:
        """The spool directory in effect."""
        return self.spool_dir or self.data_dir / "spool"

    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    """For each setting, where its value came from (`default`, a file, a variable, a flag)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One bad setting."""

    setting: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message} (from {self.source})"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` says why, one per setting."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = tuple(problems)


class _Invalid(ValueError):
    """Raised by a parser; the message completes 'setting: ...'."""


# --- parsers: raw value (str from env/flags, any TOML type from a file) -> value ---

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(raw: object) -> timedelta:
    """`1500ms`, `30s`, `5m`, `1h30m`, or a number of seconds."""
    if isinstance(raw, bool):
        raise _Invalid(f"{raw!r} is not a duration (e.g. 500ms, 30s, 5m)")
    if isinstance(raw, int | float):
        seconds = float(raw)
    else:
        text = str(raw).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise _Invalid(f"{raw!r} is not a duration (e.g. 500ms, 30s, 5m)") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds != seconds or seconds < 0 or seconds > 366 * 86400:
        raise _Invalid(f"{raw!r} is out of range (0 to 366 days)")
    return timedelta(seconds=seconds)


def _positive_duration(raw: object) -> timedelta:
    value = parse_duration(raw)
    if value <= timedelta(0):
        raise _Invalid(f"{raw!r} must be longer than zero")
    return value


def parse_address(raw: object) -> Address:
    """`host:port` or `[ipv6]:port`."""
    text = str(raw).strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    if match is None:
        raise _Invalid(f"{raw!r} is not host:port (e.g. 127.0.0.1:8080)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise _Invalid(f"port {port} is out of range (1-65535)")
    return Address(host, port)


def _url(raw: object, schemes: tuple[str, ...], need_host: bool = True) -> SplitResult:
    text = str(raw).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _Invalid(f"{mask_url(text)!r} is not a valid URL: {exc}") from None
    if parts.scheme not in schemes:
        raise _Invalid(
            f"{mask_url(text)!r} must start with {' or '.join(s + '://' for s in schemes)}"
        )
    if need_host and not parts.hostname:
        raise _Invalid(f"{mask_url(text)!r} has no host")
    if port == 0:
        raise _Invalid(f"{mask_url(text)!r} has port 0")
    return parts


def parse_upstream(raw: object) -> str:
    """An http(s) base URL; a path becomes a prefix, a query or fragment is refused."""
    parts = _url(raw, ("http", "https"))
    if parts.query or parts.fragment:
        raise _Invalid(f"{mask_url(str(raw))!r} must not have a query or fragment")
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def parse_database_url(raw: object) -> str:
    """A PostgreSQL connection URL."""
    _url(raw, ("postgres", "postgresql"), need_host=False)  # a socket: ?host=/run/postgresql
    return str(raw).strip()


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        text = str(raw).strip().lower()
        if text not in allowed:
            raise _Invalid(f"{raw!r} is not one of {', '.join(allowed)}")
        return text

    return parse


def _invalid_status(raw: object) -> int:
    try:
        status = int(str(raw).strip())
    except ValueError:
        status = 0
    if isinstance(raw, bool) or status not in (400, 404, 422):
        raise _Invalid(f"{raw!r} is not one of 400, 404, 422")
    return status


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data: `$XDG_DATA_HOME/session-lens`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "session-lens"


def _path(raw: object) -> Path:
    text = str(raw).strip()
    if not text:
        raise _Invalid("must not be empty")
    return Path(text).expanduser()


def _ca_file(raw: object) -> Path:
    path = _path(raw)
    try:
        ssl.create_default_context(cafile=str(path))
    except OSError as exc:  # ssl.SSLError is one too
        raise _Invalid(f"cannot be read as PEM certificates: {exc.strerror or exc}") from None
    return path


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _table(raw: object) -> str:
    text = str(raw).strip()
    if not all(_IDENTIFIER.fullmatch(part) for part in text.split(".")) or text.count(".") > 1:
        raise _Invalid(f"{raw!r} is not a table name ([schema.]name, letters, digits, _)")
    return text


def _column(raw: object) -> str:
    text = str(raw).strip()
    if not _IDENTIFIER.fullmatch(text):
        raise _Invalid(f"{raw!r} is not a column name (letters, digits, _)")
    return text


def sql_expression(raw: object) -> str:
    """One SQL expression, trimmed; raises ValueError for none or more than one."""
    text = str(raw).strip()
    if not text or ";" in text:
        raise _Invalid(f"{raw!r} must be one SQL expression, without ';'")
    return text


def _statuses(raw: object) -> tuple[int, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    statuses = []
    for item in items:
        try:
            status = int(str(item).strip())
        except ValueError:
            status = 0
        if isinstance(item, bool) or not 400 <= status <= 599:
            raise _Invalid(f"{item!r} is not an HTTP error status (400-599)")
        statuses.append(status)
    if not statuses:
        raise _Invalid("needs at least one status")
    return tuple(statuses)


def _lifecycle_routes(raw: object) -> tuple[LifecycleRoute, ...]:
    if isinstance(raw, str):  # from the environment or a flag: a JSON array of tables
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise _Invalid(f"is not a JSON array of route tables: {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise _Invalid("must be a list of tables with method, path, action and id_from")
    routes = []
    for number, item in enumerate(raw, 1):
        try:
            routes.append(parse_lifecycle_route(item))
        except TemplateError as exc:
            raise _Invalid(f"route {number}: {exc}") from None
    return tuple(routes)


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _size(raw: object) -> int:
    match = _SIZE.fullmatch(str(raw).strip())
    if match is None or isinstance(raw, bool):
        raise _Invalid(f"{raw!r} is not a size (e.g. 256MiB, 1GiB, or bytes)")
    size = int(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]
    if size < 1 << 16:
        raise _Invalid(f"{raw!r} is too small (at least 64KiB)")
    return size


def _count(low: int, high: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        text = str(raw).strip()
        if isinstance(raw, bool) or not text.isdigit() or not low <= int(text) <= high:
            raise _Invalid(f"{raw!r} is not a whole number from {low} to {high}")
        return int(text)

    return parse


def _time_zone(raw: object) -> tzinfo:
    text = str(raw).strip()
    if text.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Invalid(f"{raw!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None


def _period(raw: object) -> Period:
    try:
        return Period.parse(str(raw))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in _TRUE + _FALSE:
        raise _Invalid(f"{raw!r} is not true or false")
    return text in _TRUE


def _token(raw: object) -> str:
    text = str(raw).strip()
    if len(text) < 16 or any(c.isspace() for c in text):
        raise _Invalid("must be at least 16 characters, without spaces")
    return text


def _routes(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",") if item.strip()]
    elif isinstance(raw, list):
        items = [str(item) for item in raw]
    else:
        raise _Invalid(f"{raw!r} is not a list of path templates")
    if not items:
        raise _Invalid("needs at least one path template")
    for item in items:
        try:
            compile_template(item)
        except TemplateError as exc:
            raise _Invalid(str(exc)) from None
    return tuple(items)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "upstream": parse_upstream,
    "listen": parse_address,
    "admin_listen": parse_address,
    "database_url": parse_database_url,
    "validation": _choice("enforce", "observe"),
    "invalid_status": _invalid_status,
    "session_routes": _routes,
    "max_future_skew": parse_duration,
    "id_timezone": _time_zone,
    "upstream_connect_timeout": _positive_duration,
    "upstream_read_timeout": _positive_duration,
    "upstream_ca_file": _ca_file,
    "header_read_timeout": _positive_duration,
    "send_timeout": _positive_duration,
    "lingering_timeout": _positive_duration,
    "max_connections": _count(1, 1_000_000),
    "workers": _count(1, 64),
    "shutdown_grace": parse_duration,
    "log_level": _choice("debug", "info", "warning", "error"),
    "data_dir": _path,
    "sessions_table": _table,
    "sessions_id_column": _column,
    "backfill_state": sql_expression,
    "miss_statuses": _statuses,
    "not_found_body": _choice("merge", "problem", "passthrough"),
    "visibility_window": parse_duration,
    "creation_timeout": _positive_duration,
    "classification_budget": _positive_duration,
    "upstream_retention": _period,
    "upstream_partition": lambda raw: Unit(_choice(*Unit)(raw)),
    "lifecycle_source": _choice("database", "observed"),
    "lifecycle_routes": _lifecycle_routes,
    "spool_dir": _path,
    "spool_max_bytes": _size,
    "admin_token": _token,
    "max_body_bytes": _size,
    "exemplars": _bool,
}
SETTINGS = tuple(_PARSERS)

HELP = {
    "upstream": "base URL of the session service (required)",
    "listen": "proxy listener, host:port (default 127.0.0.1:8080)",
    "admin_listen": "admin listener for /metrics, /healthz, /readyz (default 127.0.0.1:9464)",
    "database_url": "PostgreSQL URL of the lifecycle tables",
    "validation": "enforce: answer malformed IDs here; observe: forward and count them",
    "invalid_status": "status for a malformed ID: 404 (default), 400 or 422",
    "session_routes": "comma-separated path templates with {session_id}",
    "max_future_skew": "how far in the future an ID's timestamp may lie (default 24h)",
    "id_timezone": "IANA time zone the IDs' timestamps are written in (default UTC)",
    "upstream_connect_timeout": "time to open an upstream connection (default 5s)",
    "upstream_read_timeout": "longest silence from the upstream while reading (default 60s)",
    "upstream_ca_file": "PEM file of CAs trusted for an https upstream (default: the system's)",
    "header_read_timeout": "time a client gets to send a request head (default 30s), else 408",
    "send_timeout": "time a client may take nothing of an answer before it is cut (default 60s)",
    "lingering_timeout": "time an early answer's connection reads and drops what comes (5s)",
    "max_connections": "client connections held open at once, per worker (default 10000)",
    "workers": "processes serving the proxy port, SO_REUSEPORT (default 1)",
    "shutdown_grace": "time in-flight requests get to finish on shutdown (default 10s)",
    "log_level": "debug, info, warning or error (default info)",
    "data_dir": "directory of the embedded PostgreSQL, used without database_url",
    "sessions_table": "the sessions table, [schema.]name (default sessions)",
    "sessions_id_column": "its ID column (default id)",
    "backfill_state": "SQL expression giving existing rows their state (default 'ACTIVE')",
    "miss_statuses": "upstream statuses that mean not found (default 404)",
    "not_found_body": "merge (default), problem or passthrough",
    "visibility_window": "how long a change may take to show upstream (default 5s)",
    "creation_timeout": "how long a creation may take before it counts as failed (default 30s)",
    "classification_budget": "time a miss may spend being explained (default 50ms)",
    "upstream_retention": "the service's store's own TTL (e.g. 30d, 6M); default: none",
    "upstream_partition": "its partition size: hour, day (default), week, month or year",
    "lifecycle_source": "database (the service's table, trigger-fed) or observed (from traffic)",
    "lifecycle_routes": "observed mode: JSON array of {method, path, action, id_from} tables",
    "spool_dir": "observed mode: where events wait for the database (default data_dir/spool)",
    "spool_max_bytes": "observed mode: the spool's cap (default 256MiB)",
    "admin_token": "bearer token for /metrics and /sessions/*/explain; required off loopback",
    "max_body_bytes": "refuse request bodies larger than this with 413 (default: no limit)",
    "exemplars": "true (default) or false: session and request IDs of misses in exemplars",
}
"""One line of help per setting, for flags and docs."""


def env_name(setting: str) -> str:
    """The environment variable for a setting."""
    return ENV_PREFIX + setting.upper()


def read_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file; raises ConfigError when it cannot be read."""
    source = f"file {path}"
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([Problem("config", source, exc.strerror or str(exc))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("config", source, f"not valid TOML: {exc}")]) from None


def load_config(
    *,
    file: Mapping[str, Any] | None = None,
    file_name: str = "config file",
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    need_upstream: bool = True,
) -> Config:
    """Merge the sources (flag over variable over file over default) and validate."""
    raw: dict[str, tuple[object, str]] = {}
    problems: list[Problem] = []
    for key, value in (file or {}).items():
        if key in _PARSERS:
            raw[key] = (value, f"{file_name}")
        else:
            problems.append(Problem(key, file_name, "unknown setting"))
    # Unknown SESSION_LENS_* variables are left alone: orchestrators inject
    # variables of that shape themselves (Kubernetes service links, for one).
    for key in _PARSERS:
        name = env_name(key)
        if environ is not None and name in environ:
            raw[key] = (environ[name], f"env {name}")
    for key, value in (flags or {}).items():
        if key not in _PARSERS:
            raise TypeError(f"no setting named {key!r}")
        if value is not None:
            raw[key] = (value, f"flag --{key.replace('_', '-')}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        try:
            values[key] = _PARSERS[key](value)
            sources[key] = source
        except _Invalid as exc:
            # Never echo a secret back, not even a malformed one.
            message = "is not a usable token: " + str(exc) if key == "admin_token" else str(exc)
            problems.append(Problem(key, source, message))
    admin = values.get("admin_listen", DEFAULT_ADMIN_LISTEN)
    if not admin.is_loopback and "admin_token" not in raw:
        problems.append(
            Problem(
                "admin_token",
                "nowhere",
                f"is required when admin_listen ({admin}) is not a loopback address:"
                f" set {env_name('admin_token')}",
            )
        )
    retention, partition = values.get("upstream_retention"), values.get("upstream_partition")
    if retention is not None and not retention.fits(partition or Unit.DAY):
        problems.append(
            Problem(
                "upstream_retention",
                raw["upstream_retention"][1],
                f"{retention} is not a whole number of {partition or Unit.DAY} partitions,"
                " as the store requires of a TTL",
            )
        )
    if need_upstream and "upstream" not in raw:
        problems.append(
            Problem("upstream", "nowhere", f"is required: --upstream or {env_name('upstream')}")
        )
    if problems:
        raise ConfigError(problems)
    for key in _PARSERS:
        sources.setdefault(key, "default")
    return Config(**values, sources=sources)


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, even in a URL that does not parse."""
    masked = re.sub(r"(://[^/:@]*:).*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", masked)


def _show(value: object) -> str:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if seconds >= size and seconds % size == 0:
                return f'"{seconds / size:g}{unit}"'
        return f'"{seconds * 1000:g}ms"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Path | Period | tzinfo):
        return _show(str(value))
    if isinstance(value, LifecycleRoute):
        source = value.id_from.value + (f":{value.pointer}" if value.pointer else "")
        return (
            f'{{ method = "{value.method}", path = "{value.template}",'
            f' action = "{value.action}", id_from = "{source}" }}'
        )
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def describe(config: Config) -> str:
    """The effective configuration as TOML, secrets masked, each line saying its source."""
    lines = []
    for item in fields(config):
        if item.name == "sources":
            continue
        value = getattr(config, item.name)
        if item.name in ("upstream", "database_url") and value is not None:
            value = mask_url(value)
        if item.name == "admin_token" and value is not None:
            value = "***"
        source = config.sources.get(item.name, "default")
        line = f"# {item.name} is not set" if value is None else f"{item.name} = {_show(value)}"
        lines.append(line.ljust(60) + f"  # {source}")
    return "\n".join(lines)
