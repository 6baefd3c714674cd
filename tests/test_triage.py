"""`session-lens triage`: log lines of misses in, the reasons, patterns and verdict out."""

import asyncio
import gzip
import io
import json
import logging
import subprocess
import sys
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pythonjsonlogger.json import JsonFormatter

from session_lens import triage as triage_module
from session_lens.config import Config, load_config
from session_lens.demo import Generator
from session_lens.explain import Explainer
from session_lens.lifecycle import CreationFailed, Lifecycle
from session_lens.metrics import Metrics
from session_lens.operate import TriageOptions, run_triage
from session_lens.page import REASON_COLOURS
from session_lens.reasons import Reason
from session_lens.reference import FAULTS, Faults, ReferenceService, new_session_id
from session_lens.triage import Fields, Lookup, Tally, report

from .conftest import MakeProxy, track_since
from .test_page import chromium

CLI = [sys.executable, "-m", "session_lens"]
EVENT = "questdb_data_provider.session_not_found"


def settings(db: str, **more: str) -> Config:
    return load_config(flags={"database_url": db, **more}, need_upstream=False)


async def triage(config: Config, *files: Path | str, **options: Any) -> dict[str, Any]:
    out = io.StringIO()
    names = [str(f) for f in files]
    code = await run_triage(
        config, TriageOptions(names, options.pop("fields", Fields()), json=True, **options), out
    )
    assert code == 0
    data: dict[str, Any] = json.loads(out.getvalue())
    return data


def reasons(data: dict[str, Any]) -> dict[str, int]:
    return {row["reason"]: row["misses"] for row in data["reasons"]}


def miss_line(session_id: str, at: datetime | None, include_deleted: bool = False) -> str:
    line: dict[str, Any] = {
        "event_type": EVENT,
        "data": {"session_id": session_id, "include_deleted": include_deleted},
    }
    if at is not None:
        line["timestamp"] = at.isoformat()
    return json.dumps(line)


# --- a real run: the reference service behind session-lens, both logging their misses ---


async def test_a_real_run_is_triaged_to_the_counts_its_metrics_recorded(
    db: str, conn: asyncpg.Connection, make_proxy: MakeProxy, aiohttp_server: Any, tmp_path: Path
) -> None:
    horizon = datetime.now(UTC) - timedelta(days=1)
    await track_since(conn, horizon)
    service_log = tmp_path / "service.log"
    lens_log = tmp_path / "session-lens.log"
    # Every fault but the audit table's lock, which makes the hop's own answer `unknown`
    # (no evidence within its budget): no reason of the lookup's, which a later read has.
    faults = Faults(enabled=frozenset(FAULTS) - {"locks_table"}, share=0.15)
    pool = await asyncpg.create_pool(db, min_size=1, max_size=8)
    handler = logging.FileHandler(lens_log)
    handler.setFormatter(
        JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
        )
    )
    proxy_log = logging.getLogger("session_lens.proxy")
    level = proxy_log.level
    proxy_log.addHandler(handler)
    proxy_log.setLevel(logging.INFO)
    service = None
    try:
        with service_log.open("w") as written:
            service = await aiohttp_server(ReferenceService(pool, faults, written).app())
            proxy = await make_proxy(
                str(service.make_url("")).rstrip("/"),
                database_url=db,
                validation="observe",
                visibility_window="2.5s",
                upstream_retention="365d",
                # Time to read the evidence on a busy machine: no miss left `unknown`.
                classification_budget="5s",
            )
            generator = Generator(proxy.url, rate=150, seed=7, horizon=horizon)
            stop = asyncio.Event()
            running = asyncio.create_task(generator.run(until=stop))
            await asyncio.sleep(8)
            stop.set()
            await running  # every lookup under way answered, counted and logged
            await service.close()  # its slow creations finished or cancelled, before the pool
    finally:
        proxy_log.removeHandler(handler)
        proxy_log.setLevel(level)
        handler.close()
        await pool.close()

    recorded = Counter[str]()
    for metric in proxy.registry.collect():
        for sample in metric.samples:
            if sample.name == "session_lens_not_found_total" and sample.value:
                recorded[sample.labels["reason"]] += int(sample.value)
    assert len(recorded) >= 9, recorded  # the run produced most reasons
    config = settings(db, visibility_window="2.5s", upstream_retention="365d")

    from_service = await triage(config, service_log)
    found = reasons(from_service)
    # The hop read its evidence some milliseconds after the service logged its 404: as if
    # judged at the logged time with a window shorter by as much. A lost session looked up
    # just then, 2.5 s after its last change, may fall either side, and a slow creation
    # that completed in those milliseconds is `creating` at the logged time but was
    # `not_yet_visible` to the hop; nothing else may differ.
    moving = ("not_yet_visible", "upstream_inconsistent", "creating")
    assert {r: n for r, n in found.items() if r not in moving} == {
        r: n for r, n in recorded.items() if r not in moving
    }
    assert sum(found.get(r, 0) for r in moving) == sum(recorded[r] for r in moving)
    shorter = reasons(
        await triage(
            settings(db, visibility_window="2.25s", upstream_retention="365d"), service_log
        )
    )
    lost = "upstream_inconsistent"
    assert found.get(lost, 0) <= recorded[lost] <= shorter.get(lost, 0)
    assert from_service["misses"] == sum(recorded.values())
    assert from_service["queries"] >= 1
    assert from_service["bad_input"] == {}
    invalid = sum(row["count"] for row in from_service["invalid_rules"].values())
    assert invalid == recorded["invalid_format"]

    from_lens = await triage(config, lens_log)
    assert reasons(from_lens) == dict(recorded)
    assert from_lens["from_session_lens"] == sum(recorded.values())


# --- patterns, each from a scenario that makes it --------------------------------


async def created(conn: asyncpg.Connection, count: int) -> list[tuple[str, datetime]]:
    """Sessions created now, each with the moment its creation was recorded."""
    lifecycle = Lifecycle(conn)
    made = []
    for _ in range(count):
        session = await lifecycle.create_session(new_session_id())
        at = await conn.fetchval(
            "SELECT max(occurred_at) FROM session_audit WHERE session_id = $1", session.id
        )
        made.append((session.id, at))
    return made


async def test_lookups_just_after_creation_are_read_after_write_though_visible_now(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    sessions = await created(conn, 30)
    log = tmp_path / "service.log"
    lines = [miss_line(sid, at + timedelta(seconds=0.3)) for sid, at in sessions[:24]]
    # A few of another cause: IDs never created, looked up later.
    lines += [miss_line(new_session_id(), datetime.now(UTC)) for _ in range(6)]
    log.write_text("\n".join(lines) + "\n")
    await asyncio.sleep(0.5)  # every session is older than 0.3 s now: visible, were it asked
    data = await triage(settings(db), log)

    assert reasons(data) == {"not_yet_visible": 24, "never_existed": 6}
    assert data["verdict"]["kind"] == "systematic"
    assert data["verdict"]["cause"] == "read_after_write"
    assert data["verdict"]["line"].startswith(
        "systematic: 80 % of misses (24 of 30) were lookups within 0.5 s of the session's"
        " creation or last change (read-after-write)"
    )
    pattern = data["patterns"][0]
    assert pattern["evidence"]["delays"] == {"<=0.5s": 24}
    # The same IDs looked up now are visible: a lookup now would be another reason.
    later = tmp_path / "later.log"
    later.write_text(miss_line(sessions[0][0], datetime.now(UTC)) + "\n")
    assert reasons(await triage(settings(db, visibility_window="0.1s"), later)) == {
        "upstream_inconsistent": 1
    }


async def test_a_service_ignoring_include_deleted_is_named(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    lifecycle = Lifecycle(conn)
    deleted = []
    for sid, _ in await created(conn, 12):
        await lifecycle.stop(sid)
        await lifecycle.soft_delete(sid)
        deleted.append(sid)
    now = datetime.now(UTC)
    lines = [miss_line(sid, now, include_deleted=True) for sid in deleted for _ in range(3)]
    lines += [miss_line(deleted[0], now)]  # without the flag: deleted, correctly 404
    log = tmp_path / "service.log"
    log.write_text("\n".join(lines) + "\n")
    data = await triage(settings(db), log)

    assert reasons(data) == {"deleted_not_served": 36, "deleted": 1}
    assert data["verdict"]["kind"] == "systematic"
    assert data["verdict"]["line"] == (
        "systematic: 36 misses (97 %) asked include_deleted=true for deleted sessions"
        " (12 IDs) and were still refused: the service ignores the flag"
    )


async def test_one_id_looked_up_again_and_again_is_a_client_retrying(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=30)
    retried = new_session_id(start)
    lines = [miss_line(retried, start + timedelta(seconds=i)) for i in range(400)]
    others = [new_session_id(start) for _ in range(40)]
    lines += [miss_line(sid, start + timedelta(seconds=i * 7)) for i, sid in enumerate(others)]
    log = tmp_path / "service.log"
    log.write_text("\n".join(lines) + "\n")
    data = await triage(settings(db), log)

    retries = next(p for p in data["patterns"] if p["cause"] == "retries")
    assert retries["misses"] == 400
    assert retries["statement"].startswith("one ID looked up 400 times (91 % of misses),")
    assert retries["statement"].endswith("each time never_existed: a client retrying")
    assert retries["examples"] == [retried]
    assert data["top_ids"][0] == {
        "session_id": retried,
        "lookups": 400,
        "first": start.strftime("%Y-%m-%d %H:%M:%S"),
        "last": (start + timedelta(seconds=399)).strftime("%Y-%m-%d %H:%M:%S"),
        "reasons": {"never_existed": 400},
    }
    # Never existed holds them all, the retries most: the largest cause is named.
    assert data["verdict"]["kind"] == "systematic"


async def test_misses_packed_into_one_stretch_are_a_burst(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    start = datetime.now(UTC) - timedelta(hours=3)
    failed_at = start + timedelta(hours=1)
    lines = []
    for i in range(60):  # creations failed while something was down, looked up at once
        sid = new_session_id(failed_at)
        await conn.execute(
            "INSERT INTO session_audit (session_id, occurred_at, old_state, new_state, trigger)"
            " VALUES ($1, $2, 'CREATING', NULL, 'api')",
            sid,
            failed_at + timedelta(seconds=i),
        )
        lines.append(miss_line(sid, failed_at + timedelta(seconds=i, milliseconds=500)))
    for i in range(40):  # the background: IDs never created, all along
        lines.append(miss_line(new_session_id(start), start + timedelta(minutes=i * 4.5)))
    log = tmp_path / "service.log"
    log.write_text("\n".join(lines) + "\n")
    data = await triage(settings(db), log)

    burst = next(p for p in data["patterns"] if p["cause"] == "burst:creation_failed")
    assert burst["misses"] == 60
    first, last = failed_at + timedelta(seconds=0.5), failed_at + timedelta(seconds=59.5)
    assert burst["statement"].startswith(
        f"all 60 misses between {first:%Y-%m-%d %H:%M:%S} and {last:%Y-%m-%d %H:%M:%S} UTC"
        " were creation_failed (creations that failed half-way)"
    )


async def test_misses_of_many_causes_are_called_scattered(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    lifecycle = Lifecycle(conn)
    ids = []
    for sid, _ in await created(conn, 8):  # deleted, looked up without the flag
        await lifecycle.stop(sid)
        await lifecycle.soft_delete(sid)
        ids.append(sid)
    for sid, _ in await created(conn, 8):  # archived
        await lifecycle.stop(sid)
        await lifecycle.archive(sid)
        ids.append(sid)
    for sid, _ in await created(conn, 8):  # purged by hand
        await lifecycle.stop(sid)
        await conn.execute("DELETE FROM sessions WHERE id = $1", sid)
        ids.append(sid)
    now = datetime.now(UTC)  # looked up after all that
    lines = [miss_line(sid, now) for sid in ids]
    lines += [miss_line(new_session_id(), now) for _ in range(8)]
    lines += [miss_line("exec_2025", now) for _ in range(4)]
    log = tmp_path / "service.log"
    log.write_text("\n".join(lines) + "\n")
    data = await triage(settings(db), log)

    assert reasons(data) == {
        "deleted": 8, "archived": 8, "purged": 8, "never_existed": 8, "invalid_format": 4,
    }  # fmt: skip
    assert data["verdict"]["kind"] == "scattered"
    assert data["verdict"]["line"].startswith(
        "scattered: no one cause holds most of the 36 misses (the largest,"
    )


# --- reading: bad input, fields, gzip, stdin ----------------------------------------


async def test_bad_input_is_counted_with_its_first_lines_and_never_stops_the_triage(
    db: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    lines = [
        miss_line(new_session_id(), now),
        "not json at all",
        "[1, 2]",
        json.dumps({"event_type": EVENT, "data": {"include_deleted": True}}),
        json.dumps({"event_type": EVENT, "timestamp": "yesterday-ish",
                    "data": {"session_id": new_session_id()}}),
        json.dumps({"event_type": "something_else", "data": {"session_id": "x"}}),
        miss_line("exec_20251330_020944_4ad060d9", now),
        miss_line("sess-42", now),
        '{"event_type": "' + EVENT + '", "data": {"session_id": "exec_2025"',
        "",
        miss_line(new_session_id(), None),
    ]  # fmt: skip
    log = tmp_path / "mixed.log"
    log.write_text("\n".join(lines) + "\n")
    data = await triage(settings(db), log)

    where = str(log)
    assert data["bad_input"] == {
        "not_json": {"count": 2, "what": "not JSON", "first": [f"{where}:2", f"{where}:9"]},
        "not_object": {"count": 1, "what": "JSON, but not an object", "first": [f"{where}:3"]},
        "no_id": {"count": 1, "what": "a miss without a session ID", "first": [f"{where}:4"]},
        "bad_time": {
            "count": 1,
            "what": "a time that does not parse (judged as of now)",
            "first": [f"{where}:5"],
        },
    }
    assert data["invalid_rules"] == {
        "calendar": {"count": 1, "first": [f"{where}:7"]},
        "pattern": {"count": 1, "first": [f"{where}:8"]},
    }
    assert reasons(data) == {"never_existed": 3, "invalid_format": 2}
    assert data["untimed"] == 2
    assert data["lines"] == 11


async def test_fields_are_found_where_they_are_said_to_be(db: str, tmp_path: Path) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    line = {
        "kind": "lookup.miss",
        "ctx": {"sid": new_session_id(at), "flags": {"deleted": "true"}},
        "when": int(at.timestamp() * 1000),
    }
    log = tmp_path / "other-shape.log"
    log.write_text(json.dumps(line) + "\n")
    fields = Fields(("kind",), "miss", ("ctx", "sid"), ("ctx", "flags", "deleted"), (("when",),))
    data = await triage(settings(db), log, fields=fields)
    assert reasons(data) == {"never_existed": 1}
    assert data["from"] == at.strftime("%Y-%m-%d %H:%M:%S")


async def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out, err)


async def test_the_command_reads_gzip_and_stdin_and_says_what_it_found(
    db: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    plain = "\n".join(miss_line(new_session_id(), now) for _ in range(5)) + "\n"
    packed = tmp_path / "rotated.log.gz"
    packed.write_bytes(gzip.compress(plain.encode()))
    done = await run_cli("triage", str(packed), "-", "--database-url", db, stdin=plain.encode())
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert text.splitlines()[0] == (  # the same 5 IDs from the file and from stdin
        "systematic: 10 misses (100 %) on 5 IDs were never_existed:"
        " IDs never created: no row and no audit entry"
    )
    assert "10 misses on 5 IDs in 10 lines" in text

    hostile = tmp_path / "hostile.log"
    hostile.write_text(miss_line("exec_\x1b[2J\x1b]0;owned\x07", now) + "\n")
    shown = await run_cli("triage", str(hostile), "--database-url", db)
    assert shown.returncode == 0, shown.stderr
    assert b"\x1b" not in shown.stdout and b"\x07" not in shown.stdout
    assert b"exec_\\x1b[2J" in shown.stdout  # escaped, as text

    # Nine minutes of misses drawn in at most 100 marks: each mark says its own span.
    spread = tmp_path / "spread.log"
    spread.write_text(
        "\n".join(miss_line(new_session_id(), now + timedelta(minutes=m)) for m in range(10))
    )
    drawn = await run_cli("triage", str(spread), "--database-url", db)
    assert drawn.returncode == 0, drawn.stderr
    header = next(line for line in drawn.stdout.decode().splitlines() if "one mark per" in line)
    assert header.startswith("timeline (one mark per 6 s,"), header
    assert "1 miss without a time" not in drawn.stdout.decode()

    missing = await run_cli("triage", str(tmp_path / "nope.log"), "--database-url", db)
    assert missing.returncode == 2
    assert b"nope.log: No such file or directory" in missing.stderr
    assert b"Traceback" not in missing.stderr


# --- every door, one reason -----------------------------------------------------


async def test_get_session_gives_the_reason_the_evidence_gives(
    conn: asyncpg.Connection,
) -> None:
    lifecycle = Lifecycle(conn)
    purged = (await lifecycle.create_session(new_session_id())).id
    await lifecycle.stop(purged)
    await conn.execute("DELETE FROM sessions WHERE id = $1", purged)
    failed = new_session_id()
    with pytest.raises(Exception, match="creation failed"):
        await lifecycle.create_session(failed, required=["owner"])
    before = new_session_id(datetime(2024, 6, 1, tzinfo=UTC))  # the db tracks since 2025
    never = new_session_id()

    found = {sid: await lifecycle.get_session(sid) for sid in (purged, failed, before, never)}
    assert {sid: (r.found, r.reason.value) for sid, r in found.items()} == {
        purged: (False, "purged"),
        failed: (False, "creation_failed"),
        before: (False, "predates_tracking"),
        never: (False, "never_existed"),
    }


def test_explain_takes_only_the_settings_it_uses() -> None:
    shown = subprocess.run([*CLI, "explain", "--help"], capture_output=True, check=True).stdout
    text = shown.decode()
    for flag in ("--listen", "--admin-listen", "--workers", "--upstream-read-timeout",
                 "--upstream", "--max-connections", "--send-timeout"):  # fmt: skip
        assert f"{flag} " not in text and f"{flag}\n" not in text, flag
    for flag in ("--database-url", "--visibility-window", "--creation-timeout", "--config",
                 "--questdb-url", "--questdb-table"):  # fmt: skip
        assert flag in text
    refused = subprocess.run(
        [*CLI, "explain", "exec_20251230_020944_4ad060d9", "--workers", "2"], capture_output=True
    )
    assert refused.returncode == 2
    assert refused.stderr.decode().startswith("session-lens explain: --workers: unknown flag")
    serve = subprocess.run([*CLI, "serve", "--help"], capture_output=True, check=True).stdout
    assert b"--workers" in serve and b"--listen" in serve


# --- the page: one file, the chart drawn by a real browser --------------------------


def png_rows(data: bytes) -> tuple[int, list[bytes]]:
    """Bytes per pixel and the unfiltered rows of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, packed, head = 8, b"", b""
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            packed += body
        at += 12 + length
    width, height = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
    assert head[8] == 8 and head[9] in (2, 6), "8-bit RGB or RGBA"
    step = 3 if head[9] == 2 else 4
    stride, raw = width * step, zlib.decompress(packed)
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        offset = y * (stride + 1)
        kind, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up = previous[i]
            corner = previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - corner
                near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up),
                           (abs(guess - corner), 2, corner))[2]  # fmt: skip
                line[i] = (line[i] + near) & 255
        rows.append(bytes(line))
        previous = line
    return step, rows


class Page(HTMLParser):
    """The elements of a page as the browser left them, and its verdict's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.verdict = ""
        self._in_verdict = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_verdict = dict(attrs).get("id") == "verdict"

    def handle_endtag(self, tag: str) -> None:
        self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._in_verdict:
            self.verdict += data


async def browse(*args: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    return out


async def test_the_html_report_is_one_page_whose_chart_a_browser_draws(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    chromium()
    start = datetime.now(UTC) - timedelta(hours=1)
    lines = [
        miss_line(new_session_id(start), start + timedelta(seconds=20 * i)) for i in range(150)
    ]
    lines.append(miss_line("<img src=x onerror=alert(1)>", start))
    log = tmp_path / "service.log"
    log.write_text("\n".join(lines) + "\n")
    page = tmp_path / "triage.html"
    data = await triage(settings(db), log, html=page)
    html = page.read_text()
    assert "<script" not in html
    assert "https://" not in html and "http://" not in html.replace(
        '"http://www.w3.org/2000/svg"', ""
    )

    dom = Page(
        (await browse(f"--user-data-dir={tmp_path / 'a'}", "--dump-dom", page.as_uri())).decode()
    )
    rects = [attrs for tag, attrs in dom.tags if tag == "rect"]
    assert rects and all(float(r["height"] or 0) > 0 for r in rects)
    assert {r["data-reason"] for r in rects} == {"never_existed", "invalid_format"}
    assert not [tag for tag, _ in dom.tags if tag in ("script", "img")]
    assert dom.verdict == data["verdict"]["line"]
    assert dom.verdict.startswith("systematic: 150 misses (99 %) on 150 IDs were never_existed")

    shot = tmp_path / "shot.png"
    await browse(
        f"--user-data-dir={tmp_path / 'b'}", f"--screenshot={shot}", "--window-size=1000,900",
        "--hide-scrollbars", page.as_uri(),
    )  # fmt: skip
    step, rows = png_rows(shot.read_bytes())
    colour = bytes.fromhex(REASON_COLOURS["never_existed"][1:])
    drawn = sum(row[i : i + 3] == colour for row in rows for i in range(0, len(row), step))
    assert drawn > 2000  # the chart's bars on the screen, not only in the markup


def test_what_is_kept_stays_bounded_whatever_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triage_module, "MAX_IDS", 1000)
    tally = Tally()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    retried = "exec_20260101_000001_0000beef"
    for n in range(100_000):  # 100 000 distinct IDs over 40 days, one retried all along
        at = start + timedelta(seconds=n * 35)
        tally.add(Lookup("log:1", f"exec_20260101_000000_{n:08x}", at, False), Reason.NEVER_EXISTED)
        if n % 50 == 0:
            tally.add(Lookup("log:1", retried, at, False), Reason.NEVER_EXISTED)
    assert len(tally.ids) <= 1000
    assert len(tally.buckets) <= triage_module.MAX_BUCKETS
    assert tally.width == 10800  # widened from 1 s as the log went on: 3 h for 40 days
    assert tally.ids[retried].count == 2000  # the frequent one is kept, and counted whole
    assert tally.misses == 102_000
    data = report(tally, lines=102_000, queries=0)
    assert data["ids_dropped"] > 90_000
    retries = next(p for p in data["patterns"] if p["cause"] == "retries")
    assert retries["evidence"]["ids"][0] == {
        "session_id": retried, "lookups": 2000, "reasons": {"never_existed": 2000}
    }  # fmt: skip


async def test_every_door_gives_one_reason_for_one_evidence(
    db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    lifecycle = Lifecycle(conn)
    purged = (await lifecycle.create_session(new_session_id())).id
    await lifecycle.stop(purged)
    await conn.execute("DELETE FROM sessions WHERE id = $1", purged)
    failed = new_session_id()
    with pytest.raises(CreationFailed):
        await lifecycle.create_session(failed, required=["owner"])
    deleted = (await lifecycle.create_session(new_session_id())).id
    await lifecycle.stop(deleted)
    await lifecycle.soft_delete(deleted)
    archived = (await lifecycle.create_session(new_session_id())).id
    await lifecycle.stop(archived)
    await lifecycle.archive(archived)
    ids = [purged, failed, deleted, archived, new_session_id(datetime(2024, 6, 1, tzinfo=UTC)),
           new_session_id()]  # fmt: skip

    config = settings(db)
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), db)
    await explainer.open()
    try:
        hop = [(await explainer.explain_miss(sid, False)).reason.value for sid in ids]
        explain = [(await explainer.report(sid)).reason.value for sid in ids]
    finally:
        await explainer.close()
    log = tmp_path / "service.log"
    log.write_text("\n".join(miss_line(sid, datetime.now(UTC)) for sid in ids) + "\n")
    triaged = {row["session_id"]: next(iter(row["reasons"])) for row in
               (await triage(config, log, top=len(ids)))["top_ids"]}  # fmt: skip
    library = [(await lifecycle.get_session(sid)).reason.value for sid in ids]

    expected = ["purged", "creation_failed", "deleted", "archived", "predates_tracking",
                "never_existed"]  # fmt: skip
    assert hop == explain == [triaged[sid] for sid in ids] == library == expected


async def test_session_lens_own_lines_keep_their_reason_and_an_unknown_is_explained_again(
    db: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC).isoformat()

    def own(message: str, session_id: str, **more: Any) -> str:
        line = {"level": "INFO", "logger": "session_lens.proxy", "message": message,
                "session_id": session_id, "time": now, **more}  # fmt: skip
        return json.dumps(line)

    log = tmp_path / "session-lens.log"
    log.write_text(
        "\n".join([
            own("session not found", new_session_id(), reason="deleted", include_deleted=False),
            own("session not found", new_session_id(), reason="unknown", include_deleted=False,
                classifier_error="no answer within the budget"),
            own("invalid session id", "exec_2025", reason="invalid_format", rule="pattern"),
            own("upstream error", new_session_id()),
        ]) + "\n"
    )  # fmt: skip
    data = await triage(settings(db), log)
    # Its own lines were judged when they were logged; the unknown one only now, from the
    # tables (nothing there: never existed).
    assert reasons(data) == {"deleted": 1, "never_existed": 1, "invalid_format": 1}
    assert data["from_session_lens"] == 3
    assert data["queries"] == 1
    assert data["invalid_rules"] == {"pattern": {"count": 1, "first": [f"{log}:3"]}}
