"""Session-route templates, compiled once at start.

A template is a path such as `/api/sessions/{session_id}`; it matches that path
and every sub-path below the ID (`/api/sessions/{session_id}/events`). Other
`{name}` placeholders match one non-empty path segment.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from .schema import SessionState

PLACEHOLDER = "session_id"
_TOKEN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    """A route template that cannot be compiled."""

    def __init__(self, template: str, problem: str) -> None:
        super().__init__(f"{template!r}: {problem}")
        self.template = template
        self.problem = problem


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A path that fell on a session route."""

    route: str
    session_id: str


def compile_template(
    template: str, *, need_id: bool = True, subpaths: bool = True
) -> re.Pattern[str]:
    """The regex for one template; raises TemplateError when it is unusable."""
    if not template.startswith("/"):
        raise TemplateError(template, "must start with '/'")
    names = _TOKEN.findall(template)
    if names.count(PLACEHOLDER) > 1 or (need_id and PLACEHOLDER not in names):
        raise TemplateError(template, "needs exactly one {session_id} placeholder")
    if len(set(names)) != len(names):
        raise TemplateError(template, "repeats a placeholder")
    parts: list[str] = []
    position = 0
    for token in _TOKEN.finditer(template):
        literal = template[position : token.start()]
        if "{" in literal or "}" in literal:
            raise TemplateError(template, "has an unbalanced brace")
        parts.append(re.escape(literal))
        if token.group(1) == PLACEHOLDER:
            parts.append("(?P<session_id>[^/]*)")
        else:
            parts.append("[^/]+")
        position = token.end()
    tail = template[position:]
    if "{" in tail or "}" in tail:
        raise TemplateError(template, "has an unbalanced brace")
    parts.append(re.escape(tail.rstrip("/") if subpaths else tail))
    return re.compile("".join(parts) + ("(?:/.*)?" if subpaths else "/?"), re.DOTALL)


_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES = re.compile(r"//+")


def normalised(path: str, merge_slashes: bool = True) -> str:
    """`path` as routes are matched on it (RFC 3986 §6.2.2): percent-encoded unreserved
    characters decoded (the other escapes' hex in upper case), empty segments merged
    if `merge_slashes` (as nginx does), and dot segments removed.

    Only matching sees it: what is forwarded stays byte-identical.
    """
    if "%" in path:
        path = _PERCENT.sub(_unescaped, path)
    if merge_slashes and "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = _without_dot_segments(path)
    return path


def _unescaped(escape: re.Match[str]) -> str:
    character = chr(int(escape[1], 16))
    return character if character in _UNRESERVED else escape[0].upper()


def _without_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path: `.` dropped, `..` dropping the one before."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    directory = segments[-1] in (".", "..") and kept  # `/a/b/..` is the directory `/a/`
    return "/" + "/".join(kept) + ("/" if directory else "")


class RouteTable:
    """Every configured session route, tried in order."""

    __slots__ = ("_routes", "names")

    def __init__(self, templates: Iterable[str]) -> None:
        self._routes = tuple((t, compile_template(t).fullmatch) for t in templates)
        self.names: tuple[str, ...] = tuple(t for t, _ in self._routes)

    def match(self, path: str) -> RouteMatch | None:
        """The route `path` (without its query) falls on, if any."""
        for name, fullmatch in self._routes:
            found = fullmatch(path)
            if found is not None:
                return RouteMatch(name, found.group(PLACEHOLDER))
        return None


class Action(StrEnum):
    """A lifecycle change the upstream can confirm."""

    CREATE = "create"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    DELETE = "delete"
    RESTORE = "restore"
    ARCHIVE = "archive"
    PURGE = "purge"


TARGET_STATE: dict[Action, SessionState | None] = {
    Action.CREATE: SessionState.ACTIVE,
    Action.PAUSE: SessionState.PAUSED,
    Action.RESUME: SessionState.ACTIVE,
    Action.STOP: SessionState.STOPPED,
    Action.DELETE: SessionState.DELETED,
    Action.RESTORE: SessionState.STOPPED,
    Action.ARCHIVE: SessionState.ARCHIVED,
    Action.PURGE: None,
}
"""The state each confirmed action leaves a session in (None: the row is gone)."""


class IdFrom(StrEnum):
    """Where a lifecycle route finds its session ID."""

    PATH = "path"
    REQUEST = "request"
    RESPONSE = "response"
    LOCATION = "location"


@dataclass(frozen=True, slots=True)
class LifecycleRoute:
    """One configured lifecycle route: `METHOD template` confirms `action` on an ID."""

    method: str
    template: str
    action: Action
    id_from: IdFrom
    pointer: str = ""
    """An RFC 6901 JSON pointer, for IDs in a request or response body."""

    @property
    def name(self) -> str:
        """The route's label in metrics: method and template, both from the config."""
        return f"{self.method} {self.template}"

    @property
    def id_source(self) -> str:
        """Where the ID is taken from, as `id_from` is written in the config."""
        return self.id_from.value + (f":{self.pointer}" if self.pointer else "")


def parse_lifecycle_route(raw: Mapping[str, object]) -> LifecycleRoute:
    """A lifecycle route from its config table; raises TemplateError naming the problem."""
    template = str(raw.get("path", ""))
    unknown = set(raw) - {"method", "path", "action", "id_from"}
    if unknown:
        raise TemplateError(template, f"unknown keys {', '.join(sorted(unknown))}")
    method = str(raw.get("method", "")).upper()
    if not re.fullmatch(r"[A-Z]+", method):
        raise TemplateError(template, f"method {raw.get('method')!r} is not an HTTP method")
    try:
        action = Action(str(raw.get("action", "")))
    except ValueError:
        choices = ", ".join(Action)
        raise TemplateError(
            template, f"action {raw.get('action')!r} is not one of {choices}"
        ) from None
    source, _, pointer = str(raw.get("id_from", "path")).partition(":")
    try:
        id_from = IdFrom(source)
    except ValueError:
        raise TemplateError(
            template, f"id_from {raw.get('id_from')!r} is not path, request:/pointer, "
            "response:/pointer or location"
        ) from None  # fmt: skip
    compile_template(template, need_id=id_from is IdFrom.PATH, subpaths=False)
    if id_from in (IdFrom.REQUEST, IdFrom.RESPONSE):
        if not pointer.startswith("/"):
            raise TemplateError(
                template, f"id_from {id_from}: needs a JSON pointer, e.g. {id_from}:/id"
            )
        if id_from is IdFrom.REQUEST and method in ("GET", "HEAD"):
            raise TemplateError(template, f"a {method} request has no body to take the ID from")
    elif pointer:
        raise TemplateError(template, f"id_from {id_from} takes no pointer")
    return LifecycleRoute(method, template, action, id_from, pointer)


DEFAULT_LIFECYCLE_ROUTES = tuple(
    parse_lifecycle_route(route)
    for route in (
        {"method": "POST", "path": "/api/sessions", "action": "create", "id_from": "response:/id"},
        *(
            {"method": "POST", "path": f"/api/sessions/{{session_id}}/{action}", "action": action}
            for action in ("pause", "resume", "stop", "restore", "archive")
        ),
        {"method": "DELETE", "path": "/api/sessions/{session_id}", "action": "delete"},
    )
)


@dataclass(frozen=True, slots=True)
class LifecycleMatch:
    """A request that fell on a lifecycle route, with the ID when the path holds it."""

    route: LifecycleRoute
    session_id: str | None


class LifecycleTable:
    """The lifecycle routes, by method, compiled once."""

    __slots__ = ("_by_method",)

    def __init__(self, routes: Iterable[LifecycleRoute]) -> None:
        by_method: dict[str, list[tuple[LifecycleRoute, re.Pattern[str]]]] = {}
        for route in routes:
            pattern = compile_template(
                route.template, need_id=route.id_from is IdFrom.PATH, subpaths=False
            )
            by_method.setdefault(route.method, []).append((route, pattern))
        self._by_method = {method: tuple(found) for method, found in by_method.items()}

    def match(self, method: str, path: str) -> LifecycleMatch | None:
        """The lifecycle route `method path` falls on, if any."""
        for route, pattern in self._by_method.get(method, ()):
            found = pattern.fullmatch(path)
            if found is not None:
                return LifecycleMatch(route, found.groupdict().get(PLACEHOLDER))
        return None


class PointerMiss(LookupError):
    """A JSON pointer that leads nowhere in a document: where its walk stopped."""

    def __init__(self, reached: str, token: str, holder: object) -> None:
        super().__init__(reached, token)
        self.reached = reached
        """The part of the pointer that resolved ("" for the whole document)."""
        self.token = token
        """The next reference token, which the value there does not have."""
        self.holder = holder
        """The value at `reached`."""


def resolve_pointer(document: object, pointer: str) -> object:
    """The value at an RFC 6901 JSON pointer; raises PointerMiss when there is none."""
    reached = ""
    for token in pointer.split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict) and key in document:
            document = document[key]
        elif isinstance(document, list) and key.isdigit() and int(key) < len(document):
            document = document[int(key)]
        else:
            raise PointerMiss(reached, token, document)
        reached += "/" + token
    return document
