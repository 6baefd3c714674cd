"""Answers of session-lens' own: RFC 9457 problem documents."""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

PROBLEM_JSON = "application/problem+json"


@dataclass(slots=True, frozen=True)
class Answer:
    """An answer of session-lens' own: an RFC 9457 problem document."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def problem_answer(
    status: int, detail: str, headers: Iterable[tuple[str, str]] = (), **members: Any
) -> Answer:
    """An RFC 9457 problem document."""
    body = {"title": phrase(status), "status": status, "detail": detail, **members}
    return Answer(status, json.dumps(body).encode(), tuple(headers))


def phrase(status: int) -> str:
    """The reason phrase of a status; that of 404 for one HTTP does not name."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Not Found"
