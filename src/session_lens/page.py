"""The explain report as a page a person reads: server-rendered HTML, nothing fetched.

Every value that came from a request or the database (the ID, each audit field)
goes through `html.escape`; the page carries no script, and its security policy
allows none.
"""

import json
from datetime import UTC, datetime
from html import escape
from typing import Any

HTML = "text/html"
SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'"
"""No script, no fetch, no frame: the page is text and its inline style."""

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 56rem;
       padding: 0 1rem; color: #1d2125; background: #fff; }
h1 { font-size: 1.25rem; word-break: break-all; }
code, time { font-family: ui-monospace, monospace; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; }
dl.facts dt { color: #5c6670; }
dl.facts dd { margin: 0; }
.reason { border-left: 6px solid #d9480f; background: #fff4e6; padding: .75rem 1rem;
          margin: 1.25rem 0; }
.reason strong { font-size: 1.1rem; }
.reason .why { margin: .35rem 0 0; }
.reason .note, .reason .also { margin: .35rem 0 0; color: #5c6670; }
ol.timeline { list-style: none; margin: 0; padding: 0 0 0 1.25rem;
              border-left: 2px solid #ced4da; }
ol.timeline li { position: relative; margin: 0 0 1rem; }
ol.timeline li::before { content: ""; position: absolute; left: -1.7rem; top: .35rem;
                         width: .75rem; height: .75rem; border-radius: 50%;
                         background: #495057; }
ol.timeline li.last::before { background: #d9480f; }
.move { font-weight: 600; }
.meta { color: #5c6670; }
.empty { color: #5c6670; }
ol.timeline li.later { color: #868e96; }
"""


def prefers_html(accept: str) -> bool:
    """Whether an `Accept` header ranks `text/html` above JSON (a browser's does; curl's not)."""
    return _quality(accept, "text", "html") > _quality(accept, "application", "json")


def _quality(accept: str, kind: str, subtype: str) -> float:
    """The q the most specific range of `accept` gives to `kind/subtype` (RFC 9110 §12.5.1)."""
    best, specificity = 0.0, -1
    for item in accept.split(","):
        media, *params = item.split(";")
        major, _, minor = media.strip().lower().partition("/")
        if major == kind and minor == subtype:
            rank = 2
        elif major == kind and minor == "*":
            rank = 1
        elif major == "*" and minor == "*":
            rank = 0
        else:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if rank > specificity:
            best, specificity = q, rank
    return best


def report_page(report: dict[str, Any]) -> str:
    """The page for one explain report, as `explain.report_json` gives it."""
    session_id = report["session_id"]
    timeline = report["timeline"]
    facts = [
        ("minted", _time(report["minted_at"])),
        ("tracked since", _time(report["tracking_horizon"])),
        ("state", _text(report["state"] or "no row")),
        ("created", _time(report["created_at"])),
        ("updated", _time(report["updated_at"])),
        ("deleted", _time(report["deleted_at"])),
    ]
    retention = report["store_retention"]
    if retention is not None:
        facts.append(
            (
                "store retention",
                f"{_text(retention['ttl'])} by {_text(retention['partition'])}: partition"
                f" {_time(retention['partition_start'])} to {_time(retention['partition_end'])}"
                f" ({_text(retention['fate'])})",
            )
        )
    if report.get("questdb") is not None or report.get("questdb_problem") is not None:
        facts.append(
            ("questdb", _text(store_summary(report["questdb"], report["questdb_problem"])))
        )
    if report.get("lifecycle_tables_problem") is not None:
        unread = f"cannot be read: {report['lifecycle_tables_problem']}"
        facts.append(("lifecycle tables", _text(unread)))
    lead, why = report["reason"], report["why"]
    other, other_why = report["reason_with_include_deleted"], report["why_with_include_deleted"]
    asked, other_asked = "", "asked with <code>include_deleted=true</code>"
    if report.get("given") == other != lead:  # the miss asked for deleted sessions too
        lead, why, other, other_why = other, other_why, lead, why
        asked, other_asked = " with <code>include_deleted=true</code>", "asked without it"
    also = ""
    if other != lead:
        also = f'<p class="also">{other_asked}: <code>{_text(other)}</code>, {_text(other_why)}</p>'
    notes = [report["note"], *report.get("replay_notes", ())]
    note = "".join(f'<p class="note">{_text(text)}</p>' for text in notes if text)
    at = report.get("at")
    if at is None:
        headline = f"A lookup{asked} now would be answered <strong>{_text(lead)}</strong>"
    else:
        given = report.get("given")
        said = f" (it was given <code>{_text(given)}</code>)" if given else ""
        headline = (
            f"A lookup{asked} at {_time(at)}, the evidence replayed as it stood then, gets"
            f" <strong>{_text(lead)}</strong>{said}"
        )
    reason = (
        f'<section class="reason" id="reason" data-reason="{_text(lead)}">'
        f'{headline}<p class="why">{_text(why)}</p>{also}{note}</section>'
    )
    moment = None if at is None else datetime.fromisoformat(at)
    shown = [e for e in timeline if moment is None or datetime.fromisoformat(e["at"]) <= moment]
    rows = "".join(
        _entry(entry, last=number == len(shown), later=number > len(shown))
        for number, entry in enumerate(timeline, 1)
    )
    history = (
        f'<ol class="timeline">{rows}</ol>'
        if rows
        else '<p class="empty">No audit entry: nothing was ever recorded for this ID.</p>'
    )
    seen = "".join(
        f"<li>{_time(event['at'])} <code>{_text(event['action'])}</code>"
        f"{'' if event['ok'] else ' (failed)'}, request <code>{_text(event['request_id'])}</code>"
        "</li>"
        for event in report.get("in_flight", ())
    )
    in_flight = f'<h2>Seen, not stored yet</h2><ul class="in-flight">{seen}</ul>' if seen else ""
    body = (
        f"<h1>Session <code>{_text(session_id)}</code></h1>"
        f"{reason}"
        f'<dl class="facts">{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)}</dl>'
        f"{in_flight}<h2>Audit timeline</h2>{history}"
    )
    return _document(f"session-lens: {session_id}", body)


def problem_page(title: str, detail: str, session_id: str | None = None) -> str:
    """A page for an explain request that has no report: a malformed ID, no database."""
    shown = f"<p>Session ID: <code>{_text(session_id)}</code></p>" if session_id else ""
    body = f'<h1>{_text(title)}</h1><p class="problem">{_text(detail)}</p>{shown}'
    return _document(f"session-lens: {title}", body)


def _entry(entry: dict[str, Any], last: bool, later: bool = False) -> str:
    old, new = entry["from"] or "(none)", entry["to"] or "(none)"
    meta = [f"trigger {_text(entry['trigger'])}"] if entry["trigger"] else []
    if entry["actor"]:
        meta.append(f"by {_text(entry['actor'])}")
    reason = f'<div class="why">{_text(entry["reason"])}</div>' if entry["reason"] else ""
    kind = " class=last" if last else " class=later" if later else ""
    after = ' <span class="meta">(after the moment replayed)</span>' if later else ""
    return (
        f"<li{kind}>{_time(entry['at'])}{after}"
        f' <span class="move">{_text(old)} → {_text(new)}</span>'
        f' <span class="meta">{", ".join(meta)}</span>{reason}</li>'
    )


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def store_summary(store: dict[str, Any] | None, problem: str | None) -> str:
    """The store's evidence in one line, from `store_json`'s members."""
    if store is None:
        return f"not asked: {problem}" if problem else "not asked"
    parts = ", ".join(
        f"{part['name']} {'present' if part['present'] else 'gone'}" for part in store["partitions"]
    )
    row = store["row"]
    found = "row absent" if row is None else "row " + json.dumps(row, sort_keys=True, default=str)
    wal = store["wal"]
    log_state = "not a WAL table"
    if wal is not None:
        log_state = "WAL suspended" if wal["suspended"] else "WAL applying"
        log_state += f", {wal['pending']} transactions pending"
    return f"partition {parts} (oldest {store['oldest_partition']}); {found}; {log_state}"


def _time(iso: str | None) -> str:
    if iso is None:
        return "—"
    moment = datetime.fromisoformat(iso).astimezone(UTC)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    return f'<time datetime="{_text(iso)}">{_text(shown)}</time>'


def _text(value: object) -> str:
    return escape(str(value), quote=True)


# --- the triage report, one page for a file: no script, nothing fetched -------------

REASON_COLOURS = {
    "invalid_format": "#868e96", "never_existed": "#495057", "creating": "#74c0fc",
    "creation_failed": "#e8590c", "deleted": "#94d82d", "deleted_not_served": "#c2255c",
    "purged": "#862e9c", "archived": "#5c940d", "not_yet_visible": "#1c7ed6",
    "upstream_inconsistent": "#e03131", "expired": "#f59f00", "predates_tracking": "#adb5bd",
    "store_suspended": "#0b7285", "unknown": "#212529",
}  # fmt: skip
_CHART_WIDTH, _CHART_HEIGHT, _CHART_SLOTS = 880, 220, 220

_TRIAGE_STYLE = """
table { border-collapse: collapse; margin: .5rem 0 1rem; }
td, th { padding: .15rem .6rem; text-align: left; border-bottom: 1px solid #e9ecef; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { border-left: 6px solid #d9480f; background: #fff4e6; padding: .75rem 1rem;
           font-size: 1.1rem; }
.verdict.scattered { border-color: #1c7ed6; background: #e7f5ff; }
.swatch { display: inline-block; width: .8rem; height: .8rem; margin-right: .35rem;
          vertical-align: -.05rem; }
.legend span.item { margin-right: 1rem; white-space: nowrap; }
svg.chart { max-width: 100%; height: auto; background: #f8f9fa; }
ul.patterns li { margin: 0 0 .6rem; }
"""


def triage_page(data: dict[str, Any]) -> str:
    """The triage report (`triage.report`'s data) as one self-contained page, the timeline
    drawn as inline SVG."""
    verdict = data["verdict"]
    span = f", {_text(data['from'])} to {_text(data['to'])} UTC" if data["from"] is not None else ""
    summary = (
        f"<p>{data['misses']:,} misses on {data['ids']:,} IDs in {data['lines']:,} lines"
        f"{span}; {data['untimed']:,} without a time.</p>"
    )
    patterns = "".join(
        f"<li>{_text(p['statement'])}"
        + (
            f"<br><span class=meta>e.g. {_text(', '.join(p['examples']))}</span>"
            if p["examples"]
            else ""
        )
        + "</li>"
        for p in data["patterns"]
    )
    reasons = "".join(
        f"<tr><td>{_swatch(r['reason'])}<code>{_text(r['reason'])}</code></td>"
        f"<td class=n>{r['misses']:,}</td><td class=n>{100 * r['share']:.1f} %</td>"
        f"<td>{_text(r['first'] or '—')}</td><td>{_text(r['last'] or '—')}</td></tr>"
        for r in data["reasons"]
    )
    ids = "".join(
        f"<tr><td><code>{_text(row['session_id'])}</code></td><td class=n>{row['lookups']:,}</td>"
        f"<td>{_text(row['first'] or '—')}</td><td>{_text(row['last'] or '—')}</td>"
        f"<td>{_text(', '.join(f'{k} {v:,}' for k, v in row['reasons'].items()))}</td></tr>"
        for row in data["top_ids"]
    )
    bad = "".join(
        f"<li>{b['count']:,} {_text(b['what'])}: lines {_text(', '.join(b['first']))}</li>"
        for b in data["bad_input"].values()
    ) + "".join(
        f"<li>{b['count']:,} invalid IDs breaking rule <code>{_text(rule)}</code>:"
        f" lines {_text(', '.join(b['first']))}</li>"
        for rule, b in data["invalid_rules"].items()
    )
    body = (
        f"<h1>Triage of {data['misses']:,} misses</h1>"
        f'<p class="verdict {_text(verdict["kind"])}" id="verdict">{_text(verdict["line"])}</p>'
        f"{summary}<h2>Patterns</h2><ul class=patterns>{patterns or '<li>none</li>'}</ul>"
        f"<h2>Timeline</h2>{_chart(data['timeline'])}"
        f"<h2>Reasons</h2><table><tr><th>reason</th><th>misses</th><th>share</th>"
        f"<th>first (UTC)</th><th>last (UTC)</th></tr>{reasons}</table>"
        f"<h2>Most looked-up IDs</h2><table><tr><th>session ID</th><th>lookups</th>"
        f"<th>first (UTC)</th><th>last (UTC)</th><th>reasons</th></tr>{ids}</table>"
        f"<h2>Bad input</h2><ul>{bad or '<li>none</li>'}</ul>"
    )
    document = _document("session-lens triage", body)
    policy = f'<meta http-equiv="Content-Security-Policy" content="{SECURITY_POLICY}">'
    return document.replace("</style>", _TRIAGE_STYLE + "</style>" + policy, 1)


def _swatch(reason: str) -> str:
    colour = REASON_COLOURS.get(reason, "#495057")
    return f'<span class="swatch" style="background:{colour}"></span>'


def _chart(timeline: dict[str, Any]) -> str:
    """Misses per bucket, stacked by reason, as SVG rectangles on a time axis."""
    buckets = timeline["buckets"]
    if not buckets:
        return '<p class="empty">No miss had a time.</p>'
    width = timeline["bucket_seconds"]
    start = datetime.fromisoformat(buckets[0]["at"]).replace(tzinfo=UTC).timestamp()
    end = datetime.fromisoformat(buckets[-1]["at"]).replace(tzinfo=UTC).timestamp()
    slots = int((end - start) // width) + 1
    per_slot = -(-slots // _CHART_SLOTS)
    columns: list[dict[str, int]] = [{} for _ in range(-(-slots // per_slot))]
    for bucket in buckets:
        at = datetime.fromisoformat(bucket["at"]).replace(tzinfo=UTC).timestamp()
        column = columns[int((at - start) // width) // per_slot]
        for reason, count in bucket["misses"].items():
            column[reason] = column.get(reason, 0) + count
    peak = max(sum(c.values()) for c in columns) or 1
    bar = _CHART_WIDTH / len(columns)
    rects = []
    for index, column in enumerate(columns):
        bottom = float(_CHART_HEIGHT)
        for reason in timeline["reasons"]:
            count = column.get(reason, 0)
            if not count:
                continue
            height = _CHART_HEIGHT * count / peak
            bottom -= height
            rects.append(
                f'<rect x="{index * bar:.2f}" y="{bottom:.2f}" width="{max(bar - 1, 1):.2f}"'
                f' height="{height:.2f}" fill="{REASON_COLOURS.get(reason, "#495057")}"'
                f' data-reason="{_text(reason)}"><title>{_text(reason)}: {count:,}</title></rect>'
            )
    last = datetime.fromtimestamp(start + len(columns) * per_slot * width, UTC)
    legend = "".join(
        f'<span class="item">{_swatch(r)}{_text(r)}</span>' for r in timeline["reasons"]
    )
    return (
        f'<svg class="chart" id="timeline" xmlns="http://www.w3.org/2000/svg"'
        f' viewBox="0 0 {_CHART_WIDTH} {_CHART_HEIGHT + 20}" width="{_CHART_WIDTH}"'
        f' height="{_CHART_HEIGHT + 20}" role="img"'
        f' aria-label="misses per {per_slot * width} s, by reason">{"".join(rects)}'
        f'<text x="0" y="{_CHART_HEIGHT + 15}" font-size="11">{_text(buckets[0]["at"])} UTC</text>'
        f'<text x="{_CHART_WIDTH}" y="{_CHART_HEIGHT + 15}" font-size="11" text-anchor="end">'
        f"{last:%Y-%m-%d %H:%M:%S} UTC</text>"
        f'<text x="4" y="12" font-size="11">peak {peak:,} per {per_slot * width:,} s</text></svg>'
        f'<p class="legend">{legend}</p>'
    )
