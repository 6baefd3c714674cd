"""The explain page: HTML for a browser, the JSON of before for everything else."""

import asyncio
import base64
import json
import os
import shutil
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from session_lens.app import create_admin_app
from session_lens.config import load_config
from session_lens.explain import Explainer, report_json
from session_lens.metrics import Metrics
from session_lens.page import prefers_html

SID = "exec_20251230_020944_4ad060d9"
TOKEN = "t0ken-for-the-admin-listener"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
MARKUP = "<script>document.title='pwned'</script><img src=x onerror=\"document.body.id='pwned'\">"


@pytest.fixture
async def explainer(db: str) -> AsyncIterator[Explainer]:
    config = load_config(flags={"upstream": "http://127.0.0.1:1", "database_url": db})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), db)
    await explainer.open()
    yield explainer
    await explainer.close()


async def admin(aiohttp_server: Any, explainer: Explainer, **settings: str) -> TestServer:
    config = load_config(flags={"upstream": "http://127.0.0.1:1", **settings})
    server: TestServer = await aiohttp_server(
        create_admin_app(config, CollectorRegistry(), explainer), host="127.0.0.1"
    )
    return server


async def history(conn: asyncpg.Connection) -> None:
    """A session's audit trail, written out of time order, one reason full of markup."""
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')", SID)
    async with conn.transaction():
        await conn.execute("SELECT set_config('session_lens.reason', $1, true)", MARKUP)
        await conn.execute("SELECT set_config('session_lens.actor', $1, true)", "<b>ops</b>")
        await conn.execute("UPDATE sessions SET state = 'DELETED' WHERE id = $1", SID)
    # An entry imported late, dated before both.
    await conn.execute(
        "INSERT INTO session_audit (session_id, occurred_at, old_state, new_state, trigger)"
        " VALUES ($1, '2025-12-30 02:09:44+00', NULL, 'CREATING', 'import')",
        SID,
    )


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html", True),
        (BROWSER, True),
        ("text/*", True),
        ("text/html;q=0.4, application/json;q=0.9", False),
    ],
)
def test_accept_decides(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


async def test_json_is_what_it_was_for_every_other_client(
    aiohttp_client: Any, explainer: Explainer, conn: asyncpg.Connection
) -> None:
    await history(conn)
    config = load_config(flags={"upstream": "http://127.0.0.1:1"})
    client = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
    # What `web.json_response(report_json(report))` has always sent.
    expected = json.dumps(report_json(await explainer.report(SID))).encode()
    for accept in (None, "*/*", "application/json", "application/json, text/html;q=0.5"):
        headers = {} if accept is None else {"Accept": accept}
        response = await client.get(f"/sessions/{SID}/explain", headers=headers)
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await response.read() == expected
    response = await client.get("/sessions/nope/explain")
    assert response.status == 400
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert (
        await response.read()
        == json.dumps(
            {
                "session_id": "nope",
                "reason": "invalid_format",
                "rule": "pattern",
                "why": "it does not have the form exec_YYYYMMDD_HHMMSS_xxxxxxxx (x: lowercase hex):"
                " a malformed ID, which no session has",
            }
        ).encode()
    )


async def test_the_page_is_behind_the_admin_token(
    aiohttp_client: Any, explainer: Explainer, conn: asyncpg.Connection
) -> None:
    await history(conn)
    config = load_config(flags={"upstream": "http://127.0.0.1:1", "admin_token": TOKEN})
    client = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
    path = f"/sessions/{SID}/explain"
    refused = await client.get(path, headers={"Accept": BROWSER})
    assert refused.status == 401
    assert SID not in await refused.text()
    # A browser is asked for the token as a password, since a link cannot carry a bearer.
    assert refused.headers["WWW-Authenticate"].startswith("Basic ")
    wrong = base64.b64encode(b"anyone:wrong").decode()
    denied = await client.get(path, headers={"Accept": BROWSER, "Authorization": f"Basic {wrong}"})
    assert denied.status == 401
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    page = await client.get(path, headers={"Accept": BROWSER, "Authorization": f"Basic {basic}"})
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in page.headers["Content-Security-Policy"]
    bearer = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert (await bearer.json())["session_id"] == SID


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it")
    pytest.skip("chromium is not installed (Debian: chromium)")


async def render(url: str, profile: Path) -> str:
    """The DOM a real headless Chromium builds from `url`, after load."""
    process = await asyncio.create_subprocess_exec(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    return out.decode()


class Dom(HTMLParser):
    """Elements and the text of the timeline's rows, as the browser left them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[str] = []
        self.times: list[str] = []
        self.reason_text = ""
        self._in_row = self._in_reason = self._in_title = False
        self.title = ""
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.tags.append((tag, named))
        if tag == "li":
            self._in_row = True
            self.rows.append("")
        if tag == "time" and self._in_row and named.get("datetime"):
            self.times.append(named["datetime"] or "")
        if tag == "section" and named.get("class") == "reason":
            self._in_reason = True
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag == "li":
            self._in_row = False
        if tag == "section":
            self._in_reason = False
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_row:
            self.rows[-1] += data
        if self._in_reason:
            self.reason_text += data
        if self._in_title:
            self.title += data


async def test_a_browser_shows_the_timeline_in_time_order_and_markup_as_text(
    aiohttp_server: Any, explainer: Explainer, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    chromium()
    await history(conn)
    server = await admin(aiohttp_server, explainer)
    base = f"http://127.0.0.1:{server.port}"
    dom = Dom(await render(f"{base}/sessions/{SID}/explain", tmp_path / "profile"))

    assert dom.title == f"session-lens: {SID}"
    assert len(dom.rows) == 3
    assert dom.times == sorted(dom.times)
    assert [row.split(" UTC ")[1].split(" trigger")[0] for row in dom.rows] == [
        "(none) → CREATING",
        "(none) → STOPPED",
        "STOPPED → DELETED",
    ]
    assert "trigger import" in dom.rows[0]
    # The audit reason and actor are on the page as the text they are, not as elements.
    assert MARKUP in dom.rows[2]
    assert "by <b>ops</b>" in dom.rows[2]
    assert "deleted" in dom.reason_text
    assert "minted 2025-12-30 02:09:44 UTC" in dom.reason_text
    body = [attrs for tag, attrs in dom.tags if tag == "body"]
    assert body == [{}]  # onerror never ran
    assert {tag for tag, _ in dom.tags} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "code", "section",
        "strong", "p", "dl", "dt", "dd", "time", "ol", "li", "span", "div",
    }  # fmt: skip

    hostile = f"{base}/sessions/{quote(MARKUP, safe='')}/explain"
    dom = Dom(await render(hostile, tmp_path / "profile"))
    assert dom.title == "session-lens: Not a session ID"
    assert not [tag for tag, _ in dom.tags if tag in ("script", "img")]
    assert [attrs for tag, attrs in dom.tags if tag == "body"] == [{}]


async def test_a_session_with_no_evidence_says_so(
    aiohttp_client: Any, explainer: Explainer
) -> None:
    config = load_config(flags={"upstream": "http://127.0.0.1:1"})
    client = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
    page = await client.get(f"/sessions/{SID}/explain", headers={"Accept": BROWSER})
    assert page.status == 200
    text = await page.text()
    assert 'data-reason="never_existed"' in text
    assert "No audit entry" in text
