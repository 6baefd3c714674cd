"""Session-route templates, compiled once at start.

A template is a path such as `/api/sessions/{session_id}`; it matches that path
and every sub-path below the ID (`/api/sessions/{session_id}/events`). Other
`{name}` placeholders match one non-empty path segment.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

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


def compile_template(template: str) -> re.Pattern[str]:
    """The regex for one template; raises TemplateError when it is unusable."""
    if not template.startswith("/"):
        raise TemplateError(template, "must start with '/'")
    names = _TOKEN.findall(template)
    if names.count(PLACEHOLDER) != 1:
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
    parts.append(re.escape(tail.rstrip("/")))
    return re.compile("".join(parts) + "(?:/.*)?", re.DOTALL)


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
