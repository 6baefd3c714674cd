"""Writing answers to the client: relayed heads, body framing, answers of our own."""

import time
from email.utils import formatdate
from http import HTTPStatus

from ..problems import PROBLEM_JSON, Answer


class Clock:
    """Today's `Date` header value, formatted once a second."""

    __slots__ = ("_at", "_value")

    def __init__(self) -> None:
        self._at = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._at:
            self._at = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


def add_fields(out: list[bytes], fields: list[tuple[bytes, bytes]]) -> None:
    for name, value in fields:
        out += (name, b": ", value, b"\r\n")


def framed(out: list[bytes], chunks: list[bytes], chunked: bool) -> None:
    """Append body chunks to `out`, each framed as a chunk when the body goes chunked."""
    if not chunked:
        out += chunks
        return
    for chunk in chunks:
        if chunk:
            out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")


def interim_head(status: int, reason: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """An interim answer (103 Early Hints...) as it is relayed."""
    out = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    add_fields(out, fields)
    out.append(b"\r\n")
    return b"".join(out)


def last_chunk(out: list[bytes], trailers: list[tuple[bytes, bytes]]) -> None:
    """Append the end of a chunked body, with its trailer fields."""
    out.append(b"0\r\n")
    add_fields(out, trailers)
    out.append(b"\r\n")


def render(
    answer: Answer, date: bytes, close: bool, head_only: bool = False, http10: bool = False
) -> bytes:
    """An answer of session-lens' own, as bytes on the wire (to a HEAD: its head)."""
    out = [
        b"HTTP/1.1 %d %s\r\n" % (answer.status, HTTPStatus(answer.status).phrase.encode()),
        b"Content-Type: %s\r\nContent-Length: %d\r\n" % (PROBLEM_JSON.encode(), len(answer.body)),
        b"Date: " + date + b"\r\n",
    ]
    for name, value in answer.headers:
        out.append(f"{name}: {value}\r\n".encode())
    if close:
        out.append(b"Connection: close\r\n")
    elif http10:  # an HTTP/1.0 connection stays open only when it is said
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    if not head_only:
        out.append(answer.body)
    return b"".join(out)
