"""Relaying an upgraded WebSocket: frames both ways, close codes echoed end to end."""

import asyncio
import contextlib
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .config import Config
from .exchange import REQUEST_ID, USABLE_REQUEST_ID, Exchange
from .hop import MAX_HEADER_BYTES, Target, appended, end_to_end_text
from .policy import Policy
from .problems import PROBLEM_JSON, Answer
from .reasons import UpstreamError

log = logging.getLogger("session_lens.proxy")

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

GOING_AWAY = 1001
INTERNAL_ERROR = 1011
CLOSE_WAIT = 2.0
MAX_REFUSAL_BODY = 1 << 20
"""The largest body of a refused upgrade relayed; a larger one is left out."""
# Codes a close frame may not carry (RFC 6455 §7.4.1); 0 is aiohttp's "no code".
_UNSENDABLE = frozenset({0, 1005, 1006, 1015})


async def _pump(source: Socket, target: Socket) -> aiohttp.WSMessage:
    """Copy data and control frames until `source` stops; return what stopped it."""
    while True:
        message = await source.receive()
        kind = message.type
        if kind is WSMsgType.TEXT:
            await target.send_str(message.data)
        elif kind is WSMsgType.BINARY:
            await target.send_bytes(message.data)
        elif kind is WSMsgType.PING:
            await target.ping(message.data)
        elif kind is WSMsgType.PONG:
            await target.pong(message.data)
        else:  # CLOSE, CLOSING, CLOSED, ERROR
            return message


async def bridge(client: Socket, upstream: Socket, stop: asyncio.Event) -> None:
    """Relay until either side closes (its close code goes to the other) or `stop` is set."""
    pumps = {
        asyncio.create_task(_pump(client, upstream)): (client, upstream),
        asyncio.create_task(_pump(upstream, client)): (upstream, client),
    }
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*pumps, stopping], return_when=asyncio.FIRST_COMPLETED)
        # The other pump keeps waiting in receive(): close() below wakes it the way
        # aiohttp means it to, and the close handshake stays intact.
        finished = next((task for task in pumps if task in done), None)
        if finished is None:  # shutting down
            await upstream.close(code=GOING_AWAY, message=b"proxy shutting down")
            await client.close(code=GOING_AWAY, message=b"proxy shutting down")
            return
        source, target = pumps[finished]
        message = None if finished.exception() else finished.result()
        if message is not None and message.type is WSMsgType.CLOSE:
            code = 1000 if message.data in _UNSENDABLE else message.data
            await target.close(code=code, message=(message.extra or "").encode())
            # Whoever closed first hears the other side's answer, as it would directly.
            reply = target.close_code
            await source.close(code=code if reply is None or reply in _UNSENDABLE else reply)
        else:  # a side vanished without a close frame, or a send failed
            failed = message is None or message.type is WSMsgType.ERROR
            await target.close(code=INTERNAL_ERROR if failed else GOING_AWAY)
            await source.close(code=INTERNAL_ERROR if failed else GOING_AWAY)
    finally:
        stopping.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps, return_exceptions=True), CLOSE_WAIT)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, stopping, return_exceptions=True)


# --- the WebSocket path: upgrades handed over by the lane, relayed by aiohttp ---------

# Headers the WebSocket client library writes itself for the upstream handshake.
_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
_NEVER_ADDED = (hdrs.SERVER, hdrs.CONTENT_TYPE)


class _Relayed(web.StreamResponse):
    """A response with the upstream's headers, and no `Server` or `Content-Type` of
    aiohttp's where the upstream sent none (`take_back_added` removes them)."""

    not_sent: tuple[str, ...] = _NEVER_ADDED
    """Which of the headers aiohttp would add the upstream did not send."""

    def relay_headers(self, headers: MultiMapping[str]) -> None:
        """Add the upstream's headers; note which of those aiohttp adds it left out."""
        self.headers.extend(headers)
        self.not_sent = tuple(name for name in _NEVER_ADDED if name not in self.headers)


class _RelayedWebSocket(_Relayed, web.WebSocketResponse):
    """The client's side of a relayed WebSocket, adding no `Server` header either."""


async def take_back_added(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: remove from a relayed answer what aiohttp added to it."""
    if isinstance(response, _Relayed):
        for name in response.not_sent:
            response.headers.popall(name, None)


def _end_to_end(
    headers: MultiMapping[str], extra: frozenset[bytes] = frozenset()
) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones (RFC 9110 §7.6.1), order and repeats kept."""
    return CIMultiDict(end_to_end_text(headers.items(), extra))


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Append `value` to a list-valued header, folding repeats into one line."""
    previous = [given.encode("latin-1") for given in headers.popall(name, ())]
    headers[name] = appended(previous, value.encode("latin-1")).decode("latin-1")


@dataclass(slots=True)
class _Answer:
    """What the upstream answered an upgrade with, as the request's trace saw it."""

    headers: MultiMapping[str] = field(default_factory=CIMultiDict)
    """The 101's headers."""
    body: bytes = b""
    """A refusal's body, when it is not over MAX_REFUSAL_BODY."""


_ANSWER: ContextVar[_Answer | None] = ContextVar("answer", default=None)
"""Where the upstream's answer to an upgrade is put, for the task relaying it."""


async def _read_answer(
    session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestEndParams
) -> None:
    """Keep the headers of a 101, or read the body of an answer that is not a 101 before
    aiohttp's WebSocket client drops it (it raises on the status, the body unread)."""
    kept = _ANSWER.get()
    response = params.response
    if kept is None:
        return
    if response.status == 101:
        kept.headers = response.headers
        return
    body = bytearray()
    while len(body) <= MAX_REFUSAL_BODY:
        chunk = await response.content.read(MAX_REFUSAL_BODY + 1 - len(body))
        if not chunk:
            kept.body = bytes(body)
            return
        body += chunk
    log.info(
        "a refused upgrade's body is too large to relay: relayed without it",
        extra={"limit_bytes": MAX_REFUSAL_BODY},
    )


def _upstream_headers(request: web.Request, exchange: Exchange) -> CIMultiDict[str]:
    """The client's upgrade headers as they go upstream, forwarded-for and all."""
    headers = _end_to_end(request.headers, _HANDSHAKE | {b"expect"})
    if request.remote:
        _append(headers, "X-Forwarded-For", request.remote)
    _append(headers, "X-Forwarded-Proto", request.scheme)
    host = request.headers.get(hdrs.HOST)
    if host:
        _append(headers, "X-Forwarded-Host", host)
    if exchange.id_generated:
        headers[REQUEST_ID] = exchange.request_id
    return headers


def _protocols(request: web.Request) -> list[str]:
    """The subprotocols the client offers, in its order."""
    return [
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    ]


async def _relay_refusal(
    request: web.Request, exchange: Exchange, status: int, headers: MultiMapping[str], body: bytes
) -> web.StreamResponse:
    """The upstream's answer to an upgrade that is not a 101, sent back whole."""
    exchange.status = status
    refusal = _Relayed(status=status)
    refusal.relay_headers(_end_to_end(headers))
    refusal.headers.popall(hdrs.CONTENT_LENGTH, None)
    refusal.content_length = len(body)
    refusal.force_close()  # the connection was the lane's: it ends here
    if exchange.id_generated:
        refusal.headers.setdefault(REQUEST_ID, exchange.request_id)
    await refusal.prepare(request)
    await refusal.write(body)
    await refusal.write_eof()
    return refusal


def _response(answer: Answer) -> web.Response:
    response = web.Response(
        status=answer.status,
        body=answer.body,
        content_type=PROBLEM_JSON,
        headers=CIMultiDict(answer.headers),
    )
    response.force_close()
    return response


class WebSocketRelay:
    """The handler of aiohttp's server, which the lane gives WebSocket upgrades to."""

    def __init__(self, config: Config, policy: Policy, target: Target) -> None:
        self._config = config
        self._policy = policy
        self._target = target
        self._client: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._config.upstream_connect_timeout.total_seconds(),
            sock_read=self._config.upstream_read_timeout.total_seconds(),
        )
        refusals = aiohttp.TraceConfig()
        refusals.on_request_end.append(_read_answer)
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=self._target.tls or True),
            trace_configs=[refusals],
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=(
                hdrs.ACCEPT,
                hdrs.ACCEPT_ENCODING,
                hdrs.USER_AGENT,
                hdrs.CONTENT_TYPE,
            ),
            trust_env=False,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Validate an upgrade to a session route, then relay the WebSocket."""
        policy = self._policy
        given = request.headers.getall(REQUEST_ID, [])
        # Two request IDs say no one thing: replaced, as an unusable one is.
        usable = len(given) == 1 and USABLE_REQUEST_ID.fullmatch(given[0]) is not None
        exchange = policy.exchange(request.raw_path, given[0] if usable else None)
        policy.begin()
        try:
            path = policy.route_path(request.raw_path.partition("?")[0])
            rejection = policy.lookups.lookup(exchange, request.method, path)
            if rejection is not None:
                return _response(rejection)
            return await self._relay(request, exchange)
        finally:
            policy.finish(exchange)

    async def _relay(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """Relay a WebSocket both ways: text, binary, ping, pong and close codes."""
        assert self._client is not None
        headers = _upstream_headers(request, exchange)
        protocols = _protocols(request)
        sent = time.perf_counter()
        answer = _Answer()
        _ANSWER.set(answer)
        try:
            upstream = await self._client.ws_connect(
                URL(self._target.base + exchange.target, encoded=True),
                headers=headers,
                protocols=protocols,
                autoclose=False,
                autoping=False,
                max_msg_size=0,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The upstream answered, but not with 101: its answer goes back whole.
            given = exc.headers or CIMultiDict()
            self._policy.answered(exchange, exc.status)
            return await _relay_refusal(request, exchange, exc.status, given, answer.body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if request.transport is None or request.transport.is_closing():
                log.debug("client went away", extra={"request_id": exchange.request_id})
                return web.Response(status=499)
            return _response(policy_failure(self._policy, exchange, exc))
        client = _RelayedWebSocket(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            autoping=False,
            max_msg_size=0,
            compress=False,
        )
        # What the upstream said with its 101 (cookies, say) goes to the client too.
        client.relay_headers(_end_to_end(answer.headers, _HANDSHAKE))
        try:
            await client.prepare(request)
            self._policy.answered(exchange, 101)
            await bridge(client, upstream, self._policy.drain.started)
        finally:
            await upstream.close()
            await client.close()
            exchange.upstream_seconds = time.perf_counter() - sent
        return client


def policy_failure(policy: Policy, exchange: Exchange, exc: BaseException) -> Answer:
    """The 502 or 504 for a handshake the upstream failed, by the client library's error."""
    if isinstance(exc, asyncio.TimeoutError):  # ServerTimeoutError is one too
        kind = UpstreamError.TIMEOUT
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = UpstreamError.CONNECT
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        kind = UpstreamError.RESET
    else:
        kind = UpstreamError.PROTOCOL
    return policy.failure(exchange, kind, exc)
