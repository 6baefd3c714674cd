"""Configuration: a TOML file, overridden by `SESSION_LENS_*` variables, overridden by flags.

Each setting is declared once, as a field of `Config`: its type, its default, and
(in the field's metadata) its parser and help. The flags, the variables, the help
text, `check-config`'s output and the README's table all follow from `SETTINGS`.

`load_config` takes every source as a plain mapping, so callers (and tests) pass
what they have instead of patching the process. Every problem is collected and
raised at once as a `ConfigError`, each naming the setting and where its value
came from.
"""

import difflib
import ipaddress
import json
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, timedelta, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .evidence.retention import Period, StoreRetention, Unit
from .ids import IdValidator
from .routes import (
    DEFAULT_LIFECYCLE_ROUTES,
    LifecycleRoute,
    TemplateError,
    compile_template,
    parse_lifecycle_route,
)
from .schema import Tables

ENV_PREFIX = "SESSION_LENS_"
MAX_FILE_BYTES = 1 << 20
"""The largest configuration file read: anything bigger is not one (a device, a log)."""
_UTC: tzinfo = UTC  # typed as `id_timezone` is, so `_setting` infers tzinfo


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


class Validation(StrEnum):
    """What happens to a request whose session ID is malformed."""

    ENFORCE = "enforce"
    """Answered here, never forwarded."""
    OBSERVE = "observe"
    """Forwarded, and counted."""


class NotFoundBody(StrEnum):
    """What a miss's body becomes."""

    MERGE = "merge"
    """The upstream's JSON with the reason merged in."""
    PROBLEM = "problem"
    """An RFC 9457 problem document."""
    PASSTHROUGH = "passthrough"
    """The upstream's, as it sent it."""


class Disclose(StrEnum):
    """What a client learns of a miss."""

    REASON = "reason"
    """The reason, in a header and the body."""
    LIFECYCLE = "lifecycle"
    """The reason, and the session's lifecycle (state, deletion time, last transition)."""
    NOTHING = "nothing"
    """Only what the upstream said; metrics, logs and explain keep the rest."""


class LifecycleSource(StrEnum):
    """Where the lifecycle tables learn of changes."""

    DATABASE = "database"
    """The service's own table, through triggers."""
    OBSERVED = "observed"
    """The traffic: confirmed lifecycle requests, recorded by session-lens."""


class Repeated(StrEnum):
    """Which value of a repeated query parameter the upstream honours."""

    FIRST = "first"
    """As Flask, aiohttp and Go's net/http read it."""
    LAST = "last"
    """As Django, Starlette (FastAPI) and PHP read it."""


class LogLevel(StrEnum):
    """The least severe log records written."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


Choice = TypeVar("Choice", bound=StrEnum)


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


_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
"""The query parameters of a PostgreSQL URL that carry a secret (libpq's, asyncpg's)."""


def mask_url(url: str) -> str:
    """The URL with every password replaced by `***`, even in a URL that does not parse,
    or in libpq's `key=value` form (`host=db password=x`)."""
    if "://" not in url:  # keyword form, or a URL missing a slash (postgresql:/u:pw@h)
        url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:/?[^@]*?:)[^@]*@", r"\1***@", url)
        return _KEYWORD.sub(_masked_parameter, url)
    masked = re.sub(r"(://[^@]*?:)[^@]*@", r"\1***@", url)
    return re.sub(r"(?<=[?&])([^&=#]*)=[^&#]*", _masked_parameter, masked)


_KEYWORD = re.compile(r"(?:(?<=\s)|^)([A-Za-z_%0-9]+)\s*=\s*(?:'(?:[^'\\]|\\.)*'?|\S*)")
"""One `key = value` of a libpq keyword/value connection string, the value quoted or not."""


def _masked_parameter(parameter: re.Match[str]) -> str:
    # Names are percent-decoded by libpq and asyncpg alike: %70assword is a password.
    if unquote(parameter[1]).lower() in _SECRET_PARAMETERS:
        return f"{parameter[1]}=***"
    return parameter[0]


def closest(word: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The known word a mistyped one was most likely meant to be, if one is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`; did you mean X?` naming the known words a mistyped one may stand for, else nothing.

    A word that begins a few known ones (`upstream_read`, `--data`) was cut short;
    any other is taken for a typo of the one closest to it.
    """
    known = list(known)
    begun = [candidate for candidate in known if candidate.startswith(word)]
    meant = begun if 0 < len(begun) <= 3 else [closest(word, known) or ""]
    return f"; did you mean {' or '.join(meant)}?" if all(meant) else ""


class _Invalid(ValueError):
    """Raised by a parser; the message completes 'setting: ...'."""


# --- parsers: raw value (str from env/flags, any TOML type from a file) -> value ---

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
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
            if not text.isascii():  # float() takes digits of every script
                raise ValueError(text)
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise _Invalid(f"{raw!r} is not a duration (e.g. 500ms, 30s, 5m)") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds != seconds or seconds < 0 or seconds > 366 * 86400:
        raise _Invalid(f"{raw!r} is out of range (0 to 366 days)")
    return timedelta(seconds=seconds)


def positive_duration(raw: object) -> timedelta:
    """A duration longer than zero; raises ValueError otherwise."""
    value = parse_duration(raw)
    if value <= timedelta(0):
        raise _Invalid(f"{raw!r} must be longer than zero")
    return value


def parse_address(raw: object) -> Address:
    """`host:port` or `[ipv6]:port`."""
    text = str(raw).strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\[\]\s]+):([0-9]+)", text)
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
    if parts.scheme not in schemes or not text[len(parts.scheme) :].startswith("://"):
        raise _Invalid(
            f"{mask_url(text)!r} must start with {' or '.join(s + '://' for s in schemes)}"
        )
    if need_host and not parts.hostname:
        raise _Invalid(f"{mask_url(text)!r} has no host")
    try:
        (parts.hostname or "").encode("idna")  # as the resolver will be asked, or else fail
    except UnicodeError:
        raise _Invalid(
            f"{mask_url(text)!r} has a host name with an empty label or one over 63 characters"
        ) from None
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


def _choice(kind: type[Choice]) -> Callable[[object], Choice]:
    def parse(raw: object) -> Choice:
        try:
            return kind(str(raw).strip().lower())
        except ValueError:
            raise _Invalid(f"{raw!r} is not one of {', '.join(kind)}") from None

    return parse


def _invalid_status(raw: object) -> int:
    text = str(raw).strip()
    try:
        status = int(text) if text.isascii() else 0
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
        text = str(item).strip()
        try:
            status = int(text) if text.isascii() else 0
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


_SIZE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?", re.IGNORECASE)
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
        whole = text.isascii() and text.isdigit()  # ASCII digits only, as they are typed
        if isinstance(raw, bool) or not whole or not low <= int(text) <= high:
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


T = TypeVar("T")


def _setting(
    default: T,
    parse: Callable[[Any], T],
    help: str,
    *,
    note: str | None = None,
    show: Callable[[T], str] | None = None,
    mask: Callable[[str], str] | None = None,
    secret: bool = False,
    required: bool = False,
) -> T:
    """A `Config` field declaring a setting; its type is the field's, checked against `parse`.

    `note` says what an unset (None) default means; `show` renders the default for
    people, `mask` for `check-config`; a `secret` is never shown nor echoed back.
    """
    metadata = {"parse": parse, "help": help, "note": note, "show": show, "mask": mask}
    return field(default=default, repr=not secret, metadata={**metadata, "required": required})


def _computed_setting(
    factory: Callable[[], T], parse: Callable[[Any], T], help: str, *, note: str
) -> T:
    """A `Config` field declaring a setting whose default is computed at load; `note` says how."""
    return field(default_factory=factory, metadata={"parse": parse, "help": help, "note": note})


def _size_text(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size % _SIZE_UNITS[unit.lower()] == 0:
            return f"{size // _SIZE_UNITS[unit.lower()]}{unit}"
    return f"{size}B"


def _actions(routes: tuple[LifecycleRoute, ...]) -> str:
    return "the REST routes for " + ", ".join(route.action for route in routes)


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration of one session-lens process."""

    upstream: str = _setting(
        "", parse_upstream, "base URL of the session service", mask=mask_url, required=True
    )
    listen: Address = _setting(
        Address("127.0.0.1", 8080), parse_address, "proxy listener, host:port"
    )
    admin_listen: Address = _setting(
        Address("127.0.0.1", 9464), parse_address, "admin listener for /metrics, /healthz, /readyz"
    )
    database_url: str | None = _setting(
        None,
        parse_database_url,
        "PostgreSQL URL of the lifecycle tables",
        note="the embedded PostgreSQL",
        mask=mask_url,
    )
    validation: Validation = _setting(
        Validation.ENFORCE,
        _choice(Validation),
        "malformed IDs: enforce answers them here, observe forwards and counts them",
    )
    invalid_status: int = _setting(404, _invalid_status, "status for a malformed ID: 400, 404, 422")
    session_routes: tuple[str, ...] = _setting(
        ("/api/sessions/{session_id}", "/sessions/{session_id}"),
        _routes,
        "comma-separated path templates with {session_id}",
    )
    merge_slashes: bool = _setting(
        True, _bool, "match routes with empty path segments merged (//), as nginx does"
    )
    """Whether `//` counts as `/` when routes are matched (what is forwarded never changes)."""
    max_future_skew: timedelta = _setting(
        timedelta(hours=24), parse_duration, "how far in the future an ID's timestamp may lie"
    )
    id_timezone: tzinfo = _setting(
        _UTC, _time_zone, "IANA time zone the IDs' timestamps are written in"
    )
    """The zone the IDs' timestamps are written in."""
    upstream_connect_timeout: timedelta = _setting(
        timedelta(seconds=5), positive_duration, "time to open an upstream connection"
    )
    upstream_read_timeout: timedelta = _setting(
        timedelta(seconds=60), positive_duration, "longest silence from the upstream while reading"
    )
    upstream_ca_file: Path | None = _setting(
        None,
        _ca_file,
        "PEM file of CAs trusted for an https upstream",
        note="the system's CAs",
    )
    """A PEM bundle trusted for an https upstream; None: the system's."""
    header_read_timeout: timedelta = _setting(
        timedelta(seconds=30),
        positive_duration,
        "time a client gets to send a request head, else 408",
    )
    send_timeout: timedelta = _setting(
        timedelta(seconds=60),
        positive_duration,
        "time a client may take nothing of an answer before it is cut",
    )
    """How long a client may take nothing of an answer before its connection is closed."""
    lingering_timeout: timedelta = _setting(
        timedelta(seconds=5),
        positive_duration,
        "time an early answer's connection reads and drops what comes",
    )
    """How long a connection closed before its request was all read goes on reading."""
    max_connections: int = _setting(
        10000, _count(1, 1_000_000), "client connections held open at once, per worker"
    )
    admin_max_connections: int = _setting(
        64, _count(1, 10_000), "connections the admin listener holds open at once"
    )
    """Connections the admin listener holds at once: few, so it never takes the proxy's."""
    workers: int = _setting(1, _count(1, 64), "processes serving the proxy port, SO_REUSEPORT")
    shutdown_grace: timedelta = _setting(
        timedelta(seconds=10), parse_duration, "time in-flight requests get to finish on shutdown"
    )
    log_level: LogLevel = _setting(
        LogLevel.INFO, _choice(LogLevel), "the least severe log records written"
    )
    data_dir: Path = _computed_setting(
        default_data_dir,
        _path,
        "directory of the embedded PostgreSQL, used without database_url",
        note="$XDG_DATA_HOME/session-lens",
    )
    sessions_table: str = _setting("sessions", _table, "the sessions table, [schema.]name")
    sessions_id_column: str = _setting("id", _column, "its ID column")
    backfill_state: str = _setting(
        "'ACTIVE'", sql_expression, "SQL expression giving existing rows their state"
    )
    backfill_created_at: str | None = _setting(
        None,
        sql_expression,
        "SQL expression giving existing rows their creation time (e.g. the table's own column)",
        note="the time the ID was minted, in id_timezone",
    )
    """Existing rows' creation time as SQL over the row; None: when the ID was minted."""
    backfill_updated_at: str | None = _setting(
        None,
        sql_expression,
        "SQL expression giving existing rows the time they last changed",
        note="their creation time",
    )
    """Existing rows' last change as SQL over the row; None: their creation time."""
    lock_timeout: timedelta = _setting(
        timedelta(seconds=2),
        positive_duration,
        "longest wait of migrate for a lock on the sessions table (its service waits as long)",
    )
    repeated_parameter: Repeated = _setting(
        Repeated.FIRST,
        _choice(Repeated),
        "which of a repeated include_deleted the upstream honours",
    )
    """Which value of a repeated `include_deleted` decides, as the upstream's framework reads it."""
    miss_statuses: tuple[int, ...] = _setting(
        (404,), _statuses, "upstream statuses that mean not found"
    )
    not_found_body: NotFoundBody = _setting(
        NotFoundBody.MERGE,
        _choice(NotFoundBody),
        "a miss's body: the reason merged into its JSON, a problem document, or as sent",
    )
    disclose: Disclose = _setting(
        Disclose.REASON,
        _choice(Disclose),
        "what a client learns of a miss: its reason, the reason and the lifecycle, or nothing",
    )
    visibility_window: timedelta = _setting(
        timedelta(seconds=5), parse_duration, "how long a change may take to show upstream"
    )
    creation_timeout: timedelta = _setting(
        timedelta(seconds=30),
        positive_duration,
        "how long a creation may take before it counts as failed",
    )
    classification_budget: timedelta = _setting(
        timedelta(milliseconds=50), positive_duration, "time a miss may spend being explained"
    )
    upstream_retention: Period | None = _setting(
        None,
        _period,
        "the service's store's own TTL (e.g. 30d, 6M)",
        note="the store keeps everything",
    )
    """The service's store's own TTL; None: it keeps everything."""
    upstream_partition: Unit = _setting(Unit.DAY, _choice(Unit), "the store's partition size")
    questdb_url: str | None = _setting(
        None,
        parse_database_url,
        "PGWire URL of the service's own QuestDB, read as evidence",
        note="the store is not asked",
        mask=mask_url,
    )
    """The service's QuestDB (postgresql://admin:quest@host:8812/qdb); None: not asked."""
    questdb_table: str = _setting("sessions", _column, "the service's sessions table in QuestDB")
    questdb_id_column: str = _setting("id", _column, "its session ID column")
    questdb_timestamp_column: str = _setting(
        "created_at", _column, "its designated timestamp: when the session was created"
    )
    questdb_budget: timedelta = _setting(
        timedelta(milliseconds=50), positive_duration, "time a miss's row query in QuestDB may take"
    )
    questdb_pool_size: int = _setting(
        4, _count(1, 64), "the most connections to QuestDB at once, per process"
    )
    questdb_slack: timedelta = _setting(
        timedelta(minutes=10),
        positive_duration,
        "how far from the second its ID names a session's row is stamped in QuestDB",
    )
    lifecycle_source: LifecycleSource = _setting(
        LifecycleSource.DATABASE,
        _choice(LifecycleSource),
        "where lifecycle events come from: the service's table (trigger-fed) or traffic",
    )
    lifecycle_routes: tuple[LifecycleRoute, ...] = _setting(
        DEFAULT_LIFECYCLE_ROUTES,
        _lifecycle_routes,
        "observed mode: JSON array of {method, path, action, id_from} tables",
        show=_actions,
    )
    spool_dir: Path | None = _setting(
        None,
        _path,
        "observed mode: where events wait for the database",
        note="data_dir/spool",
    )
    """Where observed events wait for the database; None: `data_dir`/spool."""
    spool_max_bytes: int = _setting(
        256 << 20, _size, "observed mode: the spool's cap", show=_size_text
    )
    max_body_bytes: int | None = _setting(
        None, _size, "refuse request bodies larger than this with 413", note="no limit"
    )
    """Request bodies larger than this are refused with 413; None: no limit."""
    exemplars: bool = _setting(
        True, _bool, "whether the session and request IDs of misses go into exemplars"
    )
    """Whether metrics carry the session and request IDs of misses as exemplars."""
    admin_token: str | None = _setting(
        None,
        _token,
        "bearer token for /metrics and /sessions/*/explain; required off loopback",
        secret=True,
    )
    """Bearer token the admin listener asks for; required off loopback."""

    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    """For each setting, where its value came from (`default`, a file, a variable, a flag)."""
    id_validator: IdValidator = field(init=False, repr=False, compare=False)
    """The session-ID rules as configured, built once."""
    tables: Tables = field(init=False, repr=False, compare=False)
    """The lifecycle tables' names as configured, built once."""

    def __post_init__(self) -> None:
        # Built here, not in load_config, so that `replace` builds them anew.
        object.__setattr__(
            self, "id_validator", IdValidator(self.max_future_skew, self.id_timezone)
        )
        object.__setattr__(self, "tables", Tables(self.sessions_table, self.sessions_id_column))

    @property
    def observes(self) -> bool:
        """Whether lifecycle events are observed in traffic (and so recorded)."""
        return self.lifecycle_source == LifecycleSource.OBSERVED

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


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, as its field on `Config` declares it."""

    name: str
    type: Any
    default: Any
    """The value when nothing sets it; `MISSING` when computed at load."""
    parse: Callable[[Any], Any]
    help: str
    note: str | None = None
    show: Callable[[Any], str] | None = None
    mask: Callable[[Any], str] | None = None
    required: bool = False
    secret: bool = False

    @property
    def env(self) -> str:
        """Its environment variable."""
        return env_name(self.name)

    @property
    def flag(self) -> str:
        """Its command-line flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as a person reads it: `required`, `unset, ...`, or the value."""
        if self.required:
            return "required"
        if self.default is None:
            return "unset" + (f", {self.note}" if self.note else "")
        if self.default is MISSING:
            return str(self.note)
        return (self.show or _plain)(self.default)

    @property
    def help_line(self) -> str:
        """What the setting is, its choices and its default, for `--help`."""
        choices = ", ".join(self.type) + "; " if _is_choice(self.type) else ""
        default = "" if self.required else "default: "
        return f"{self.help} ({choices}{default}{self.default_text})"


def _is_choice(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, StrEnum)


SETTINGS = tuple(
    Setting(item.name, item.type, item.default, secret=not item.repr, **item.metadata)
    for item in fields(Config)
    if item.metadata
)
"""Every setting, in the order `check-config` and the README list them."""
_BY_NAME = {setting.name: setting for setting in SETTINGS}


STORE_SETTINGS = ("database_url", "data_dir", "sessions_table", "sessions_id_column", "log_level")
"""What every command that reads or writes the lifecycle store uses."""
CLASSIFICATION_SETTINGS = (
    "max_future_skew",
    "id_timezone",
    "visibility_window",
    "creation_timeout",
    "upstream_retention",
    "upstream_partition",
    "lifecycle_source",
)
"""What explaining a miss takes besides the store: the ID's rules and the reasons' limits."""
QUESTDB_SETTINGS = (
    "questdb_url",
    "questdb_table",
    "questdb_id_column",
    "questdb_timestamp_column",
    "questdb_budget",
    "questdb_pool_size",
    "questdb_slack",
)
"""The service's own QuestDB, read as evidence beside the lifecycle store."""
COMMAND_SETTINGS: Mapping[str, tuple[str, ...]] = {
    "explain": STORE_SETTINGS + CLASSIFICATION_SETTINGS + QUESTDB_SETTINGS,
    "triage": STORE_SETTINGS + CLASSIFICATION_SETTINGS + QUESTDB_SETTINGS,
    "migrate": (
        *STORE_SETTINGS,
        "backfill_state",
        "backfill_created_at",
        "backfill_updated_at",
        "lock_timeout",
        "id_timezone",
    ),
    "prune": STORE_SETTINGS,
    "import": (*STORE_SETTINGS, "max_future_skew", "id_timezone", "lifecycle_source"),
}
"""The settings each command shows and takes as flags; a command not named takes them all.
The file and the environment hold every setting whatever the command."""


def settings_for(command: str) -> tuple[Setting, ...]:
    """The settings `command` takes as flags, in `SETTINGS` order."""
    names = COMMAND_SETTINGS.get(command)
    return SETTINGS if names is None else tuple(s for s in SETTINGS if s.name in names)


def env_name(setting: str) -> str:
    """The environment variable for a setting."""
    return ENV_PREFIX + setting.upper()


def file_source(path: Path) -> str:
    """Where a setting from this file came from, printable whatever bytes its name holds."""
    return "file " + os.fsencode(path).decode("utf-8", "backslashreplace")


def read_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file; raises ConfigError when it cannot be read."""
    try:
        return tomllib.loads(_utf8(_file_bytes(path)))
    except OSError as exc:
        message = exc.strerror or str(exc)
    except _Invalid as exc:
        message = str(exc)
    except tomllib.TOMLDecodeError as exc:
        message = f"not valid TOML: {exc}"
    except RecursionError:
        message = "arrays or tables nested too deep to be read"
    raise ConfigError([Problem("config", file_source(path), message)])


def _file_bytes(path: Path) -> bytes:
    """A regular file's bytes, up to `MAX_FILE_BYTES`; raises OSError or _Invalid.

    Anything else is refused before a byte is read: `/dev/zero` never ends, and a
    named pipe would not even open without O_NONBLOCK until someone writes to it.
    """
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise _Invalid("is not a regular file")
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _Invalid(f"is larger than {_size_text(MAX_FILE_BYTES)}: no configuration is as big")
    return data


def _utf8(data: bytes) -> str:
    """A TOML file's text; raises _Invalid naming the line and column of the first bad byte."""
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, start) + 1
        column = len(data[start : exc.start].decode()) + 1
        raise _Invalid(
            f"line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8,"
            " which TOML requires"
        ) from None


def load_config(
    *,
    file: Mapping[str, Any] | None = None,
    file_name: str = "config file",
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    need_upstream: bool = True,
) -> Config:
    """Merge the sources (flag over variable over file over default) and validate."""
    file = file or {}
    problems = [
        Problem(key, file_name, "unknown setting" + did_you_mean(key, _BY_NAME))
        for key in file
        if key not in _BY_NAME
    ]
    raw = {
        **{key: (value, file_name) for key, value in file.items() if key in _BY_NAME},
        **_from_environ(environ or {}),
        **_from_flags(flags or {}),
    }
    values, sources = _parse(raw, problems)
    problems += _conflicts(values, raw)
    if need_upstream:
        problems += _missing(raw)
    if problems:
        raise ConfigError(problems)
    return Config(**values, sources={**dict.fromkeys(_BY_NAME, "default"), **sources})


Raw = dict[str, tuple[object, str]]
"""For each setting set somewhere, its raw value and where it came from."""


def _from_environ(environ: Mapping[str, str]) -> Raw:
    # Unknown SESSION_LENS_* variables are left alone: orchestrators inject
    # variables of that shape themselves (Kubernetes service links, for one).
    return {s.name: (environ[s.env], f"env {s.env}") for s in SETTINGS if s.env in environ}


_NEAR_MISS = 0.85
"""How alike an unknown variable's name must be to a setting's to be taken for a typo.

Close enough for SESSION_LENS_UPSTREAM_TIMEOUT, not for the SESSION_LENS_PORT_8080_TCP
and SESSION_LENS_SERVICE_HOST that Kubernetes injects for a service of that name.
"""


def stray_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each unknown `SESSION_LENS_*` variable that nearly names a setting."""
    names = [*_BY_NAME, "config"]
    known = {env_name(name) for name in names}
    warnings = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in known:
            continue
        meant = closest(variable.removeprefix(ENV_PREFIX).lower(), names, _NEAR_MISS)
        if meant is not None:
            warnings.append(
                f"{variable} is not a setting, and is ignored; did you mean {env_name(meant)}?"
            )
    return warnings


def _from_flags(flags: Mapping[str, Any]) -> Raw:
    unknown = flags.keys() - _BY_NAME.keys()
    if unknown:
        raise TypeError(f"no setting named {min(unknown)!r}")
    return {
        key: (value, f"flag {_BY_NAME[key].flag}")
        for key, value in flags.items()
        if value is not None
    }


def _parse(raw: Raw, problems: list[Problem]) -> tuple[dict[str, Any], dict[str, str]]:
    """The values that parse, and their sources; a problem for each that does not."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        setting = _BY_NAME[key]
        try:
            check_text(value)
            _check_shape(setting, value)
            values[key] = setting.parse(value)
            sources[key] = source
        except _Invalid as exc:
            # Never echo a secret back, not even a malformed one.
            message = f"is not a usable token: {exc}" if setting.secret else str(exc)
            problems.append(Problem(key, source, message))
        except RecursionError:
            problems.append(Problem(key, source, "is nested too deep to be read"))
    return values, sources


def _check_shape(setting: "Setting", raw: object) -> None:
    """Refuse a TOML value of the wrong kind, which `str()` would otherwise turn into
    some text (`["x"]` into `"['x']"`); raises _Invalid."""
    if isinstance(raw, dict):
        raise _Invalid("is a table; a single value is expected")
    if isinstance(raw, list) and not isinstance(setting.default, tuple):
        raise _Invalid("is an array; a single value is expected")
    if setting.secret and not isinstance(raw, str):
        raise _Invalid("must be a string")


def check_text(raw: object) -> None:
    """Refuse a value from bytes that are not UTF-8, without echoing it; raises ValueError.

    The environment and argv keep such bytes as lone surrogates (surrogateescape),
    which no parser refuses but nothing downstream can encode: a header, a log line.
    """
    if isinstance(raw, str):
        try:
            raw.encode()
        except UnicodeEncodeError as exc:
            raise _Invalid(f"must be UTF-8 text, and character {exc.start + 1} is not") from None


def _conflicts(values: Mapping[str, Any], raw: Raw) -> list[Problem]:
    """Settings each fine alone that do not go together."""
    problems = []
    admin = values.get("admin_listen", _BY_NAME["admin_listen"].default)
    if not admin.is_loopback and "admin_token" not in raw:
        problems.append(
            Problem(
                "admin_token",
                "nowhere",
                f"is required when admin_listen ({admin}) is not a loopback address:"
                f" set {env_name('admin_token')}",
            )
        )
    retention = values.get("upstream_retention")
    partition = values.get("upstream_partition", _BY_NAME["upstream_partition"].default)
    if retention is not None and not retention.fits(partition):
        problems.append(
            Problem(
                "upstream_retention",
                raw["upstream_retention"][1],
                f"{retention} is not a whole number of {partition} partitions,"
                " as the store requires of a TTL",
            )
        )
    return problems


def _missing(raw: Raw) -> list[Problem]:
    return [
        Problem(s.name, "nowhere", f"is required: {s.flag} or {s.env}")
        for s in SETTINGS
        if s.required and s.name not in raw
    ]


def _duration_text(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


def _plain(value: object) -> str:
    """A default as help text shows it."""
    if isinstance(value, timedelta):
        return _duration_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(map(_plain, value))
    return str(value)


def _show(value: object) -> str:
    if isinstance(value, timedelta):
        return f'"{_duration_text(value)}"'
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
    for setting in SETTINGS:
        value = getattr(config, setting.name)
        if value is not None and setting.secret:
            value = "***"
        elif value is not None and setting.mask:
            value = setting.mask(value)
        source = config.sources.get(setting.name, "default")
        line = (
            f"# {setting.name} is not set" if value is None else f"{setting.name} = {_show(value)}"
        )
        lines.append(line.ljust(60) + f"  # {source}")
    return "\n".join(lines)
