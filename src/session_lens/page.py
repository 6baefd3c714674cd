"""The explain report as a page a person reads: server-rendered HTML, nothing fetched.

Every value that came from a request or the database (the ID, each audit field)
goes through `html.escape`; the page carries no script, and its security policy
allows none.
"""

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


def _time(iso: str | None) -> str:
    if iso is None:
        return "—"
    moment = datetime.fromisoformat(iso).astimezone(UTC)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    return f'<time datetime="{_text(iso)}">{_text(shown)}</time>'


def _text(value: object) -> str:
    return escape(str(value), quote=True)
