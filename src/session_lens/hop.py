"""The HTTP rules of a hop (RFC 9110 §7.6, RFC 9112): which fields go no further, what
X-Forwarded-* become, and where the upstream is.

It imports nothing from the package: the HTTP lane and the WebSocket relay both follow it.
"""

import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 65536
"""The largest header field, either way: gateways pass large cookies and tokens."""
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
"""Fields about one connection only, lowered: never relayed (RFC 9110 §7.6.1)."""
LENGTH = frozenset({b"content-length"})
REQUEST_DROPPED = HOP_BY_HOP | {b"expect"}
"""A request's fields that go no further: hop-by-hop ones, and Expect, met by the hop."""
NEVER_DROPPED = frozenset({b"content-length", b"host"})
"""A request's framing and routing, which stay whatever its Connection header names."""
FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
"""The fields a hop appends to, lowered."""
_ANSWER_DROPPED = HOP_BY_HOP
_UNFRAMED_DROPPED = HOP_BY_HOP | LENGTH
PROXY = b"proxy-"
"""Fields named so concern the proxy itself (Proxy-Authorization...): never relayed."""


class Framing(Enum):
    """How a message's body is delimited (RFC 9112 §6)."""

    NONE = "none"
    """It has none that is sent (an answer to HEAD, or a 204 or 304 relayed), or none is
    known yet."""
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"
    """It ends with the connection."""


# Members bound once: on Python 3.11 looking one up on its class costs a descriptor call.
_LENGTH, _CHUNKED, _CLOSE = Framing.LENGTH, Framing.CHUNKED, Framing.CLOSE
BODYLESS = frozenset({204, 304})
"""Statuses whose answers never have a body (RFC 9110 §6.4.1)."""


def connection_tokens(value: bytes) -> set[bytes]:
    """The names a Connection header's value lists, lowered."""
    return {token.strip(b" \t") for token in value.lower().split(b",")}


def dropped(named: set[bytes], base: frozenset[bytes], kept: frozenset[bytes]) -> frozenset[bytes]:
    """The fields a message loses on its way: `base`, and what its Connection header
    names (`named`, lowered) except `kept`."""
    return base | (named - kept) if named else base


def passes(lowered: bytes, drop: frozenset[bytes]) -> bool:
    """Whether a field (its name lowered) goes on, given what is `dropped`."""
    return lowered not in drop and not lowered.startswith(PROXY)


def request_fields(
    lowered_fields: list[tuple[bytes, bytes, bytes]], named: set[bytes]
) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
    """A request's end-to-end fields (each as lowered name, name, value), in order, and
    the X-Forwarded-* values it came with, which the hop appends to; `named`, what its
    Connection header lists, goes too, but for its framing and routing."""
    drop = REQUEST_DROPPED
    if named:  # `dropped`, inline: most requests name nothing but keep-alive or close
        drop = drop | (named - NEVER_DROPPED)
    kept: list[tuple[bytes, bytes]] = []
    forwarded: dict[bytes, list[bytes]] = {}
    for lowered, name, value in lowered_fields:
        if lowered in drop or lowered.startswith(PROXY):  # `passes`, inline: once a field
            continue
        if lowered in FORWARDED:
            forwarded.setdefault(lowered, []).append(value)
        else:
            kept.append((name, value))
    return kept, forwarded


def answer_framing(
    status: int, fields: list[tuple[bytes, bytes]]
) -> tuple[Framing, int | None, list[bytes], set[bytes]]:
    """How an answer's body is delimited (RFC 9112 §6.3) and its length if it has one,
    its fields' names lowered, and the names its Connection header lists."""
    framing, length = _CLOSE, None
    names: list[bytes] = []
    named: set[bytes] = set()
    for name, value in fields:
        lowered = name.lower()
        names.append(lowered)
        if lowered == b"transfer-encoding":
            last = value.lower().rsplit(b",", 1)[-1].strip()
            framing = _CHUNKED if last == b"chunked" else _CLOSE
        elif lowered == b"content-length" and framing is not _CHUNKED:
            framing, length = _LENGTH, int(value)
        elif lowered == b"connection":
            named |= connection_tokens(value)
    if status in BODYLESS:
        framing = _LENGTH
    return framing, length, names, named


def end_to_end(
    fields: list[tuple[bytes, bytes]], names: list[bytes], named: set[bytes], framed: bool
) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    """An answer's fields without hop-by-hop ones, and the names of those kept, lowered.

    `names` are the fields' names lowered, `named` what their Connection header lists.
    `framed` keeps Content-Length (the message's framing, whatever its Connection
    names); otherwise it goes, saying nothing true of a re-framed body.
    """
    drop = _ANSWER_DROPPED if framed else _UNFRAMED_DROPPED
    if named:  # `dropped`, inline: most answers name nothing
        drop = drop | (named - LENGTH if framed else named)
    kept: list[tuple[bytes, bytes]] = []
    for field, lowered in zip(fields, names, strict=True):
        if lowered not in drop and not lowered.startswith(PROXY):  # `passes`, inline
            kept.append(field)
    return kept, {lowered for lowered in names if lowered not in drop}


def end_to_end_text(
    headers: Iterable[tuple[str, str]], extra: frozenset[bytes] = frozenset()
) -> list[tuple[str, str]]:
    """`headers` (as a client library gives them) without hop-by-hop ones and `extra`,
    order and repeats kept."""
    pairs = [(name, value, name.lower().encode("latin-1")) for name, value in headers]
    named: set[bytes] = set()
    for _, value, lowered in pairs:
        if lowered == b"connection":
            named |= connection_tokens(value.encode("latin-1"))
    drop = dropped(named, HOP_BY_HOP | extra, frozenset())
    return [(name, value) for name, value, lowered in pairs if passes(lowered, drop)]


def appended(previous: Iterable[bytes], value: bytes) -> bytes:
    """A list-valued field (X-Forwarded-*) with `value` appended, repeats folded in one."""
    return b", ".join((*previous, value))


@dataclass(frozen=True, slots=True)
class Target:
    """The upstream as every connection to it needs it, built once."""

    base: str
    """The configured URL without a trailing slash: a request's target is appended."""
    host: str
    port: int
    authority: bytes
    """Its `host[:port]`, for a request that names none (HTTP/1.0)."""
    prefix: bytes
    """Its path, put before every request's."""
    tls: ssl.SSLContext | None

    @classmethod
    def of(cls, url: str, ca_file: Path | None = None) -> "Target":
        """The target of an `http(s)://host[:port][/prefix]` URL; an https one verified
        against `ca_file`, or the system's CAs."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        tls = (
            ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if secure else None
        )
        return cls(
            base=url.rstrip("/"),
            host=parts.hostname or "",
            port=parts.port or (443 if secure else 80),
            authority=parts.netloc.rpartition("@")[2].encode(),
            prefix=parts.path.rstrip("/").encode(),
            tls=tls,
        )
