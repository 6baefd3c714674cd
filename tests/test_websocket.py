"""WebSocket upgrades are relayed both ways: frames, ping/pong, close codes."""

import asyncio

import aiohttp
from aiohttp import WSMsgType, web

from .conftest import MakeProxy, Upstream


async def test_echo_both_ways(upstream: Upstream, make_proxy: MakeProxy) -> None:
    closed_with: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("v2.chat",), autoping=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
            elif message.type is WSMsgType.PING:
                await ws.pong(message.data)
                await ws.ping(b"from-upstream")
        closed_with.set_result(ws.close_code)
        return ws

    upstream.respond = echo
    proxy = await make_proxy(upstream.url)
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(
            f"{proxy.url}/ws/stream?x=1",
            protocols=("v1.chat", "v2.chat"),
            autoping=False,
            headers={"X-Token": "t"},
        ) as ws,
    ):
        assert ws.protocol == "v2.chat"
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert (await ws.receive()).data == b"\x02\x01\x00"
        await ws.ping(b"are-you-there")
        pong = await ws.receive()
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"are-you-there")
        ping = await ws.receive()
        assert (ping.type, ping.data) == (WSMsgType.PING, b"from-upstream")
        await ws.close(code=4001, message=b"done here")
    assert await asyncio.wait_for(closed_with, 5) == 4001
    [seen] = upstream.seen
    assert seen.raw_path == "/ws/stream?x=1"
    assert seen.header("X-Token") == ["t"]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert proxy.metric("session_lens_requests_total", kind="passthrough", code="1xx") == 1


async def test_upstream_close_code_reaches_client(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    async def closes(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("bye")
        await ws.close(code=4403, message=b"forbidden now")
        return ws

    upstream.respond = closes
    proxy = await make_proxy(upstream.url)
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url}/ws") as ws:
        assert (await ws.receive()).data == "bye"
        closing = await ws.receive()
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 4403
        assert closing.extra == "forbidden now"


async def test_refused_upgrade_keeps_upstream_status(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    async def refuses(request: web.Request) -> web.StreamResponse:
        return web.Response(status=401, text="log in", headers={"WWW-Authenticate": "Bearer"})

    upstream.respond = refuses
    proxy = await make_proxy(upstream.url)
    async with aiohttp.ClientSession() as client:
        try:
            await client.ws_connect(f"{proxy.url}/ws")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 401
            assert exc.headers is not None
            assert exc.headers["WWW-Authenticate"] == "Bearer"
            assert "X-Request-ID" in exc.headers
            assert exc.headers["Content-Length"] == "6"  # the body is relayed too
        else:
            raise AssertionError("the upgrade went through")


async def test_handshake_headers_reach_the_client(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    async def with_cookie(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        ws.headers["Set-Cookie"] = "sid=1"
        ws.headers["X-Up"] = "yes"
        await ws.prepare(request)
        await ws.close()
        return ws

    upstream.respond = with_cookie
    proxy = await make_proxy(upstream.url)
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url}/ws") as ws:
        response = ws._response  # the only way to see the 101's headers with aiohttp
        assert response.headers["Set-Cookie"] == "sid=1"
        assert response.headers["X-Up"] == "yes"


async def test_close_codes_and_answers_cross_unchanged(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    upstream_saw: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def waits(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        upstream_saw.set_result(ws.close_code)
        return ws

    upstream.respond = waits
    proxy = await make_proxy(upstream.url)
    async with aiohttp.ClientSession() as client:
        ws = await client.ws_connect(f"{proxy.url}/ws")
        await ws.close(code=4000, message=b"bye")
        # aiohttp's server answers a close with 1000: the client hears that answer,
        # exactly as it would without the hop.
        assert ws.close_code == 1000
    assert await asyncio.wait_for(upstream_saw, 5) == 4000


async def test_upstream_close_and_the_clients_answer(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    upstream_got: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def closes(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=4001)
        upstream_got.set_result(ws.close_code)
        return ws

    upstream.respond = closes
    proxy = await make_proxy(upstream.url)
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url}/ws") as ws:
        message = await ws.receive()
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 4001)
    assert await asyncio.wait_for(upstream_got, 5) == 1000  # the aiohttp client's answer


async def test_upstream_dying_mid_socket_closes_the_client_side(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("about to vanish")
        assert request.transport is not None
        request.transport.abort()
        return ws

    upstream.respond = dies
    proxy = await make_proxy(upstream.url)
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url}/ws") as ws:
        assert (await ws.receive()).data == "about to vanish"
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert ws.close_code in (1001, 1011)
