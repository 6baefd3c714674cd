"""Request heads as the lane reads them: what is relayed, what is refused, and how.

llhttp has parsed the head (strictly: it refuses bare LF, folded lines and a
Content-Length beside Transfer-Encoding); this reads what the lane needs of it, and
keeps the end-to-end fields, in order and as sent, for the upstream.
"""

from collections.abc import Callable
from enum import Enum
from urllib.parse import urlsplit

import httptools

from ..exchange import USABLE_REQUEST_ID_BYTES, Exchange
from ..hop import connection_tokens, request_fields
from ..observation import Observation
from ..policy import Policy
from .upstream import Upstream


class Refusal(Exception):
    """A request this hop answers itself and then closes the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def too_large(limit: int | None) -> Refusal:
    """The refusal of a body larger than `max_body_bytes`."""
    return Refusal(413, f"the request body is larger than {limit} bytes")


class Stage(Enum):
    """How far a request has come, from the hop's side."""

    QUEUED = "queued"
    """Parsed, not started: its body is kept as it comes."""
    HERE = "here"
    """Answered by the hop itself: the rest of its body is read and dropped."""
    SENT = "sent"
    """Its head is upstream (`upstream` says where): body bytes go straight on."""
    REPLYING = "replying"
    """Some of its answer has gone to the client."""


class Request:
    """One request parsed from the client, and how far its relay has come."""

    __slots__ = (
        "body",
        "chunked",
        "close",
        "done",
        "exchange",
        "expect",
        "fields",
        "forwarded",
        "host",
        "http10",
        "length",
        "method",
        "observation",
        "path",
        "read_at",
        "refusal",
        "request_id",
        "size",
        "stage",
        "tap",
        "target",
        "terminated",
        "trailers",
        "upgrade_body",
        "upstream",
        "websocket",
    )

    def __init__(self, method: bytes, http10: bool) -> None:
        self.method = method
        self.http10 = http10
        self.target = b""
        """As the upstream gets it: origin form, or `*`."""
        self.path = ""
        self.host: bytes | None = None
        self.request_id: bytes | None = None
        self.fields: list[tuple[bytes, bytes]] = []
        """End-to-end fields, in order, as sent."""
        self.forwarded: dict[bytes, list[bytes]] = {}
        self.chunked = False
        self.length = 0
        """Its body's Content-Length, if it has one."""
        self.expect = False
        self.close = False
        self.websocket = False
        self.upgrade_body = False
        """An upgrade but a WebSocket's, with a body: llhttp skipped the body, which is
        read as this request's all the same (the upgrade goes no further)."""
        self.refusal: Refusal | None = None
        """An answer of our own, decided from the head: the connection closes after it."""
        self.stage = Stage.QUEUED
        self.body: list[bytes] = []
        """Body bytes read and not yet sent upstream."""
        self.size = 0
        self.done = False
        """Whether its body has been read to its end."""
        self.read_at = 0.0
        """When the last of its body was read."""
        self.trailers: list[tuple[bytes, bytes]] = []
        self.terminated = False
        """Whether the chunked body's end has been written for the upstream."""
        self.tap: bytearray | None = None
        """The first bytes of a body kept to find a session ID in."""
        self.exchange: Exchange | None = None
        self.upstream: Upstream | None = None
        self.observation: Observation | None = None

    @property
    def replied(self) -> bool:
        """Whether any of an answer has gone to the client."""
        return self.stage is Stage.REPLYING or self.stage is Stage.HERE


def read_head(
    parser: httptools.HttpRequestParser,
    url: bytes,
    fields: list[tuple[bytes, bytes]],
    policy: Policy,
) -> Request:
    """The request whose head `parser` has just read (its target `url` and its `fields`),
    with what the lane needs of it; a refusal in it when it is not to be relayed."""
    version = parser.get_http_version()
    request = Request(parser.get_method(), version == "1.0")
    try:
        if request.method == b"CONNECT":
            raise Refusal(400, "CONNECT is not served: this is not a forward proxy")
        _read_fields(request, fields, policy.max_body)
        _read_target(request, url)
        if version not in ("1.0", "1.1"):
            raise Refusal(505, f"HTTP/{version} is not served; HTTP/1.1 is")
        if not request.http10 and request.host is None:
            raise Refusal(400, "the request has no Host header")
    except Refusal as refusal:
        request.refusal = refusal
    if request.websocket and (request.chunked or request.length):
        request.refusal = Refusal(400, "a WebSocket handshake has no body")
    if request.refusal is not None:
        request.close = True
        return request
    request.close = request.close or not parser.should_keep_alive()
    if parser.should_upgrade() and not request.websocket:
        request.upgrade_body = request.chunked or request.length > 0
    if policy.observer is not None and request.method in (b"POST", b"PUT", b"PATCH"):
        request.tap = bytearray()  # kept in case it is a lifecycle request
    return request


def _read_fields(request: Request, fields: list[tuple[bytes, bytes]], max_body: int | None) -> None:
    named: set[bytes] = set()
    upgrade = b""
    lowered_fields = [(name.lower(), name, value) for name, value in fields]
    for lowered, _name, value in lowered_fields:
        if lowered == b"connection":
            named |= connection_tokens(value)
        elif lowered == b"upgrade":
            upgrade = value.lower()
        else:
            read = _FIELD_READERS.get(lowered)
            if read is not None:
                read(request, value, max_body)
    request.close = b"close" in named
    request.websocket = request.method == b"GET" and upgrade == b"websocket" and b"upgrade" in named
    given = request.request_id
    if given is not None and (
        b"x-request-id" in named or USABLE_REQUEST_ID_BYTES.fullmatch(given) is None
    ):  # replaced, as if absent
        request.request_id = None
        named = named | {b"x-request-id"}
    request.fields, request.forwarded = request_fields(lowered_fields, named)


def _host(request: Request, value: bytes, max_body: int | None) -> None:
    if request.host is not None:
        raise Refusal(400, "the request has more than one Host header")
    request.host = value


def _transfer_encoding(request: Request, value: bytes, max_body: int | None) -> None:
    codings = [coding.strip(b" \t") for coding in value.lower().split(b",")]
    if codings[-1] != b"chunked":  # no telling where the body ends (RFC 9112 §6.3)
        raise Refusal(400, "the Transfer-Encoding does not end in chunked")
    if len(codings) > 1 or request.chunked:
        raise Refusal(501, "transfer codings other than chunked are not relayed")
    request.chunked = True


def _content_length(request: Request, value: bytes, max_body: int | None) -> None:
    request.length = int(value)  # llhttp has checked it is one number
    if max_body is not None and request.length > max_body:
        request.refusal = too_large(max_body)


def _expect(request: Request, value: bytes, max_body: int | None) -> None:
    if value.lower() != b"100-continue":
        raise Refusal(417, "the only expectation met is 100-continue")
    request.expect = True


def _request_id(request: Request, value: bytes, max_body: int | None) -> None:
    # Two of them say no one thing: both are replaced, as an unusable one is.
    request.request_id = value if request.request_id is None else b""


_FIELD_READERS: dict[bytes, Callable[[Request, bytes, int | None], None]] = {
    b"host": _host,
    b"transfer-encoding": _transfer_encoding,
    b"content-length": _content_length,
    b"expect": _expect,
    b"x-request-id": _request_id,
}
"""What a request's fields (their names lowered) say of how it is framed and routed."""


def _read_target(request: Request, target: bytes) -> None:
    if target.startswith(b"/"):
        request.target = target
    elif target == b"*" and request.method == b"OPTIONS":
        request.target = target
        return
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        # Absolute form (RFC 9112 §3.2.2): its authority is the host, the rest the path.
        parts = urlsplit(target.decode("ascii", "replace"))
        request.target = (parts.path or "/").encode() + (
            b"?" + parts.query.encode() if parts.query else b""
        )
        host = parts.netloc.rpartition("@")[2].encode()
        request.fields = [(n, v) for n, v in request.fields if n.lower() != b"host"]
        request.fields.insert(0, (b"Host", host))
        request.host = host
    else:
        raise Refusal(400, "the request target must be a path")
    request.path = request.target.partition(b"?")[0].decode("latin-1")
