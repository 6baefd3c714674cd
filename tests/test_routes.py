import pytest

from session_lens.routes import (
    RouteMatch,
    RouteTable,
    TemplateError,
    compile_template,
    normalised,
)

table = RouteTable(["/api/sessions/{session_id}", "/sessions/{session_id}"])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/sessions/abc", RouteMatch("/api/sessions/{session_id}", "abc")),
        ("/api/sessions/abc/events", RouteMatch("/api/sessions/{session_id}", "abc")),
        ("/api/sessions/abc/", RouteMatch("/api/sessions/{session_id}", "abc")),
        ("/api/sessions/", RouteMatch("/api/sessions/{session_id}", "")),
        ("/sessions/x%2Fy", RouteMatch("/sessions/{session_id}", "x%2Fy")),
        ("/api/sessions", None),
        ("/api/sessionsX/abc", None),
        ("/other/sessions/abc", None),
        ("/", None),
    ],
)
def test_match(path: str, expected: RouteMatch | None) -> None:
    assert table.match(path) == expected


def test_other_placeholders_match_one_segment() -> None:
    tenants = RouteTable(["/t/{tenant}/s/{session_id}"])
    assert tenants.match("/t/acme/s/abc") == RouteMatch("/t/{tenant}/s/{session_id}", "abc")
    assert tenants.match("/t/a/b/s/abc") is None


def test_literal_parts_are_not_regex() -> None:
    dotted = RouteTable(["/v1.0/s/{session_id}"])
    assert dotted.match("/v1x0/s/abc") is None
    assert dotted.match("/v1.0/s/abc") is not None


@pytest.mark.parametrize(
    "template",
    [
        "api/{session_id}",
        "/api/sessions",
        "/a/{session_id}/{session_id}",
        "/a/{x}/{x}/{session_id}",
        "/a/{session_id}}",
        "/a/{/{session_id}",
    ],
)
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(template)


@pytest.mark.parametrize(
    ("path", "merged", "kept"),
    [
        ("/api/sessions/x", "/api/sessions/x", "/api/sessions/x"),
        ("//api//sessions/x", "/api/sessions/x", "//api//sessions/x"),
        ("/api/./sessions/x", "/api/sessions/x", "/api/sessions/x"),
        ("/api/a/b/../../sessions/x", "/api/sessions/x", "/api/sessions/x"),
        ("/../api/sessions/x", "/api/sessions/x", "/api/sessions/x"),
        ("/a/b/.", "/a/b/", "/a/b/"),
        ("/a/b/..", "/a/", "/a/"),
        ("/a/%2e%2E/b", "/b", "/b"),  # escaped dots are dots
        ("/exec%5F2025%5f01%7E", "/exec_2025_01~", "/exec_2025_01~"),
        ("/a/%c3%a9/%2f/%20", "/a/%C3%A9/%2F/%20", "/a/%C3%A9/%2F/%20"),  # reserved stay escaped
        ("/a/.hidden/x", "/a/.hidden/x", "/a/.hidden/x"),
        ("/a//../b", "/b", "/a/b"),
    ],
)
def test_paths_are_normalised_for_matching(path: str, merged: str, kept: str) -> None:
    assert normalised(path) == merged
    assert normalised(path, merge_slashes=False) == kept
