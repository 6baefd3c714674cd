"""Forwarding is transparent: what the upstream sees and what the client gets back."""

import asyncio
import gzip
import logging

import aiohttp
import pytest
from aiohttp import web

from .conftest import (
    VALID_ID,
    MakeProxy,
    ProxyUnderTest,
    Upstream,
    raw_exchange,
    read_head,
)


def request_bytes(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def test_request_headers_reach_upstream_unchanged_but_hop_by_hop(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    response = await raw_exchange(
        proxy.port,
        request_bytes(
            "GET /things?a=1&b=%2F HTTP/1.1",
            "Host: api.example.test:8443",
            "Accept: text/html",
            "Cookie: a=1",
            "Cookie: b=2",
            "X-Custom: one",
            "X-Custom: two",
            "Connection: close, X-Hop-Private",
            "X-Hop-Private: secret",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Trailer: X-Checksum",
            "Upgrade: h2c",
            "Proxy-Authorization: Basic Zm9vOmJhcg==",
            "Proxy-Connection: keep-alive",
            "X-Request-ID: req-123",
        ),
    )
    assert response.status == 200
    [seen] = upstream.seen
    assert seen.method == "GET"
    assert seen.raw_path == "/things?a=1&b=%2F"
    assert seen.headers == [
        ("Host", "api.example.test:8443"),
        ("Accept", "text/html"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("X-Request-ID", "req-123"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "api.example.test:8443"),
    ]
    assert response.header("X-Request-ID") == []  # the client sent one; nothing to add


async def test_forwarded_headers_are_appended(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    await raw_exchange(
        proxy.port,
        request_bytes(
            "GET / HTTP/1.1",
            "Host: edge.test",
            "X-Forwarded-For: 203.0.113.7",
            "X-Forwarded-For: 10.1.1.1",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: public.test",
            "Connection: close",
        ),
    )
    [seen] = upstream.seen
    assert seen.header("X-Forwarded-For") == ["203.0.113.7, 10.1.1.1, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["https, http"]
    assert seen.header("X-Forwarded-Host") == ["public.test, edge.test"]


async def test_request_id_generated_when_absent(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    response = await raw_exchange(
        proxy.port, request_bytes("GET / HTTP/1.1", "Host: h", "Connection: close")
    )
    [returned] = response.header("X-Request-ID")
    [seen] = upstream.seen
    assert seen.header("X-Request-ID") == [returned]
    assert len(returned) == 32


async def test_client_library_defaults_are_not_added(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    # A bare request: no Accept, Accept-Encoding, User-Agent or Content-Type may appear.
    await raw_exchange(
        proxy.port,
        request_bytes(
            "POST /upload HTTP/1.1",
            "Host: h",
            "Content-Length: 3",
            "Connection: close",
            body=b"abc",
        ),
    )
    [seen] = upstream.seen
    names = [name.lower() for name, _ in seen.headers]
    assert names == [
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ]
    assert seen.body == b"abc"


async def test_response_headers_pass_back_unchanged_but_hop_by_hop(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    body = b'{"ok":true}'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 201 Made It\r\n"
            b"Set-Cookie: first=1; Path=/\r\n"
            b"X-Upstream: yes\r\n"
            b"Set-Cookie: second=2; HttpOnly\r\n"
            b"Connection: keep-alive, X-Private\r\n"
            b"X-Private: hidden\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Upgrade: h2c\r\n"
            b"Set-Cookie: third=3\r\n"
            b"Date: Tue, 01 Dec 2026 00:00:00 GMT\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(answer))
    response = await raw_exchange(
        proxy.port,
        request_bytes("GET /x HTTP/1.1", "Host: h", "X-Request-ID: r1", "Connection: close"),
    )
    assert (response.status, response.reason) == (201, "Made It")
    assert response.header("Set-Cookie") == ["first=1; Path=/", "second=2; HttpOnly", "third=3"]
    names = [name.lower() for name, _ in response.headers]
    # Nothing of aiohttp's own (Server, Content-Type) and no hop-by-hop header but
    # the Connection: close the client asked for.
    assert sorted(names) == sorted(
        [
            "set-cookie",
            "x-upstream",
            "set-cookie",
            "set-cookie",
            "date",
            "content-length",
            "connection",
        ]
    )
    assert response.header("Connection") == ["close"]
    assert response.header("Date") == ["Tue, 01 Dec 2026 00:00:00 GMT"]
    assert response.body == body


async def test_compressed_bytes_pass_untouched(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    payload = gzip.compress(b'{"id": "x"}' * 100, mtime=0)

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream.respond = gzipped
    response = await raw_exchange(
        proxy.port,
        request_bytes("GET /z HTTP/1.1", "Host: h", "Accept-Encoding: gzip", "Connection: close"),
    )
    assert response.header("Content-Encoding") == ["gzip"]
    assert response.header("Content-Length") == [str(len(payload))]
    assert response.body == payload
    assert upstream.seen[0].header("Accept-Encoding") == ["gzip"]


async def test_head_keeps_content_length_without_body(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 1234)

    upstream.respond = sized
    response = await raw_exchange(
        proxy.port, request_bytes("HEAD /h HTTP/1.1", "Host: h", "Connection: close")
    )
    assert response.status == 200
    assert response.header("Content-Length") == ["1234"]
    assert response.body == b""
    assert upstream.seen[0].method == "HEAD"


async def test_chunked_request_and_response_stream(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"alpha-", b"beta-", b"gamma"):
            await response.write(part)
        await response.write_eof()
        return response

    upstream.respond = chunked
    response = await raw_exchange(
        proxy.port,
        request_bytes(
            "PUT /c HTTP/1.1",
            "Host: h",
            "Transfer-Encoding: chunked",
            "Connection: close",
            body=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
    )
    assert response.status == 200
    assert response.content == b"alpha-beta-gamma"
    [seen] = upstream.seen
    assert seen.body == b"hello world"
    assert seen.header("Transfer-Encoding") == ["chunked"]


async def test_empty_bodies(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    upstream.respond = empty
    response = await raw_exchange(
        proxy.port,
        request_bytes("DELETE /e HTTP/1.1", "Host: h", "Content-Length: 0", "Connection: close"),
    )
    assert response.status == 204
    assert response.body == b""
    assert upstream.seen[0].body == b""
    assert upstream.seen[0].header("Content-Length") == ["0"]


async def test_expect_continue(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/upload", data=b"payload", expect100=True) as response,
    ):
        assert response.status == 200
    assert upstream.seen[0].body == b"payload"


async def test_any_method_and_status(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    async def teapot(request: web.Request) -> web.StreamResponse:
        return web.Response(status=418, text=request.method)

    upstream.respond = teapot
    async with aiohttp.ClientSession() as client:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
            async with client.request(method, f"{proxy.url}/any") as response:
                assert response.status == 418
                assert await response.text() == method


async def test_redirects_are_not_followed(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    async def moved(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    upstream.respond = moved
    response = await raw_exchange(
        proxy.port, request_bytes("GET /old HTTP/1.1", "Host: h", "Connection: close")
    )
    assert response.status == 302
    assert response.header("Location") == ["/elsewhere"]
    assert len(upstream.seen) == 1


async def test_upstream_cookies_are_not_replayed_to_other_clients(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    async def sets_cookie(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="hi")
        response.set_cookie("session", "alice")
        return response

    upstream.respond = sets_cookie
    for _ in range(2):
        await raw_exchange(
            proxy.port, request_bytes("GET / HTTP/1.1", "Host: h", "Connection: close")
        )
    assert [seen.header("Cookie") for seen in upstream.seen] == [[], []]


async def test_upstream_path_prefix(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(upstream.url + "/base")
    await raw_exchange(
        proxy.port,
        request_bytes(f"GET /api/sessions/{VALID_ID}?x=1 HTTP/1.1", "Host: h", "Connection: close"),
    )
    assert upstream.seen[0].raw_path == f"/base/api/sessions/{VALID_ID}?x=1"


async def test_keep_alive_to_upstream_is_reused(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    peers = []

    async def who(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    upstream.respond = who
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.get(f"{proxy.url}/k") as response:
                await response.read()
    assert len(set(peers)) == 1


async def test_absolute_form_target_is_forwarded_as_a_path(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    response = await raw_exchange(
        proxy.port,
        request_bytes(
            "GET http://edge.test/abs?q=1 HTTP/1.1", "Host: edge.test", "Connection: close"
        ),
    )
    assert response.status == 200
    assert upstream.seen[0].raw_path == "/abs?q=1"


async def test_upgrade_header_alone_is_not_a_websocket(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    for method in ("GET", "POST"):
        response = await raw_exchange(
            proxy.port,
            request_bytes(f"{method} /plain HTTP/1.1", "Host: h", "Upgrade: websocket",
                          "Content-Length: 0", "Connection: close"),
        )  # fmt: skip
        assert response.status == 200
        assert response.json() == {"ok": True, "path": "/plain"}
    assert [seen.method for seen in upstream.seen] == ["GET", "POST"]


async def test_empty_request_id_is_replaced(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    response = await raw_exchange(
        proxy.port, request_bytes("GET / HTTP/1.1", "Host: h", "X-Request-ID:", "Connection: close")
    )
    [returned] = response.header("X-Request-ID")
    assert len(returned) == 32
    assert upstream.seen[0].header("X-Request-ID") == [returned]


async def test_upstream_request_id_is_kept(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    async def own_id(request: web.Request) -> web.StreamResponse:
        return web.Response(text="x", headers={"X-Request-ID": "upstream-made"})

    upstream.respond = own_id
    response = await raw_exchange(
        proxy.port, request_bytes("GET / HTTP/1.1", "Host: h", "Connection: close")
    )
    assert response.header("X-Request-ID") == ["upstream-made"]


async def test_large_headers_pass_both_ways(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    big = "v" * 20_000

    async def big_header(request: web.Request) -> web.StreamResponse:
        return web.Response(text="x", headers={"X-Big": big})

    upstream.respond = big_header
    response = await raw_exchange(
        proxy.port,
        request_bytes("GET / HTTP/1.1", "Host: h", f"Cookie: c={big}", "Connection: close"),
    )
    assert response.status == 200
    assert response.header("X-Big") == [big]
    assert upstream.seen[0].header("Cookie") == [f"c={big}"]


async def test_client_leaving_early_is_no_error(
    upstream: Upstream, proxy: ProxyUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    abandoned = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            abandoned.set()  # the hop let go of the upstream request too, as nginx does
            raise
        return web.json_response({"late": True})

    upstream.respond = slow
    with caplog.at_level(logging.DEBUG):
        _, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(request_bytes("GET /slow HTTP/1.1", "Host: h"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await asyncio.wait_for(abandoned.wait(), 5)
        await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert proxy.metric("session_lens_inflight_requests") == 0


async def test_compressed_request_bodies_pass_untouched(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    payload = gzip.compress(b'{"id": "x"}' * 1000, mtime=0)
    response = await raw_exchange(
        proxy.port,
        request_bytes("POST /in HTTP/1.1", "Host: h", "Content-Encoding: gzip",
                      f"Content-Length: {len(payload)}", "Connection: close", body=payload),
    )  # fmt: skip
    assert response.status == 200
    [seen] = upstream.seen
    assert seen.body == payload
    assert seen.header("Content-Encoding") == ["gzip"]
