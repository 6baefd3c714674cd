"""Relaying an upgraded WebSocket: frames both ways, close codes echoed end to end."""

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

GOING_AWAY = 1001
INTERNAL_ERROR = 1011
CLOSE_WAIT = 2.0
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
