"""The admin listener's door, on a real `session-lens serve`: a slow head is cut as on
the proxy port, credentials cannot outwait it, and its connection limit keeps the
proxy's descriptors for the proxy."""

import asyncio
import time

import aiohttp

from .conftest import Upstream, free_port, parse_response, raw_exchange, wait_until_healthy
from .test_restart import lens

TOKEN = "a-token-of-sixteen-or-more"


async def _read_all(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """What comes until the connection closes, and how long it took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), within)
    return data, time.monotonic() - started


async def test_a_half_sent_head_gets_408_within_the_head_timeout(
    upstream: Upstream, db: str
) -> None:
    port = free_port()
    async with lens(
        upstream.url, db, port, "--header-read-timeout", "1s", "--admin-token", TOKEN
    ) as (process, admin):
        await wait_until_healthy(admin, process)
        heads = [
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            # The token check cannot be outwaited: a head bearing half a token is cut too.
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a-tok",
        ]
        for head in heads:
            reader, writer = await asyncio.open_connection("127.0.0.1", admin)
            writer.write(head)
            data, took = await _read_all(reader, within=10)
            writer.close()
            assert parse_response(data).status == 408, data
            assert 0.9 < took < 5, took
        # A kept-alive connection: the second head is timed as the first was.
        reader, writer = await asyncio.open_connection("127.0.0.1", admin)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        data, took = await _read_all(reader, within=10)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data, data
        assert 0.9 < took < 5, took


async def test_the_admin_connection_limit_refuses_and_leaves_the_proxy_serving(
    upstream: Upstream, db: str
) -> None:
    port = free_port()
    async with lens(upstream.url, db, port, "--admin-max-connections", "4") as (process, admin):
        await wait_until_healthy(admin, process)
        held = [await asyncio.open_connection("127.0.0.1", admin) for _ in range(4)]
        await asyncio.sleep(0.2)
        refused = await raw_exchange(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.status == 503
        assert refused.header("retry-after") == ["1"]
        # The proxy is untouched by what the admin listener holds.
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/anything") as response,
        ):
            assert response.status == 200
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.2)
        last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        again = await raw_exchange(admin, last)
        assert again.status == 200


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_timeout(
    upstream: Upstream, db: str
) -> None:
    """On both listeners: not after the idle time, so silent connections cannot hold the
    admin listener's few places."""
    port = free_port()
    async with lens(
        upstream.url, db, port, "--header-read-timeout", "1s", "--admin-max-connections", "2"
    ) as (process, admin):
        await wait_until_healthy(admin, process)
        for listener in (port, admin, admin):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener)
            data, took = await _read_all(reader, within=10)
            writer.close()
            assert data == b"" and 0.9 < took < 5, (listener, data, took)
