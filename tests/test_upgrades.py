"""Requests that ask to upgrade, from the clients users have: only a WebSocket's leaves
HTTP/1.1; any other is relayed as the plain request it is, body and all."""

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from .conftest import MakeProxy, Origin, Upstream, need, raw_exchange


async def curl(*args: str) -> tuple[int, bytes]:
    """Run the real curl binary; its exit code and what it wrote."""
    process = await asyncio.create_subprocess_exec(
        need("curl", "curl"), "-s", "-m", "10", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out


@pytest.mark.parametrize(
    "args",
    [
        ["-d", "hello=world"],
        [],
        ["-H", "Transfer-Encoding: chunked", "--data-binary", "a chunked body"],
        ["-X", "PUT", "--data-binary", "@{big}"],
    ],
    ids=["POST", "GET", "chunked POST", "large PUT"],
)
async def test_curl_http2_through_the_hop_as_direct(
    origin: Origin, make_proxy: MakeProxy, args: list[str], tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 3_000_000)
    args = [arg.format(big=big) for arg in args]
    proxy = await make_proxy(origin.url)
    direct = await curl("--http2", "-w", "%{http_code}", *args, f"{origin.url}/anything")
    hop = await curl("--http2", "-w", "%{http_code}", *args, f"{proxy.url}/anything")
    assert direct[0] == 0 and direct[1].endswith(b"200")
    assert hop == direct
    await asyncio.sleep(0.2)  # nginx logs once its answer is out
    seen = origin.requests()
    assert len(seen) == 2
    if origin.name == "gunicorn":  # the body, as it arrived
        assert seen[0] == seen[1]
    else:
        assert seen[0]["length"] == seen[1]["length"]


WEBSOCKET_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_refused_websocket_upgrade_is_relayed_whole(
    upstream: Upstream, make_proxy: MakeProxy, chunked: bool
) -> None:
    async def refuses(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(status=403, text="not for you", headers={"X-Why": "tenant"})
        response = web.StreamResponse(status=403, headers={"X-Why": "tenant"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"not ", b"for ", b"you"):
            await response.write(part)
        return response

    upstream.respond = refuses
    proxy = await make_proxy(upstream.url)
    response = await raw_exchange(proxy.port, WEBSOCKET_UPGRADE)
    assert response.status == 403
    assert response.header("X-Why") == ["tenant"]
    assert response.content == b"not for you"
    assert response.header("Content-Length") == ["11"]


async def test_http2_with_prior_knowledge_is_told_http2_is_not_served(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    response = await raw_exchange(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert response.status == 505
    assert response.json()["detail"].startswith("HTTP/2 is not served")
    assert upstream.seen == []
