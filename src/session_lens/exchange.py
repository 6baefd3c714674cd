"""What one request has become on its way through the hop, for counting and logging."""

import random
import re
import time
from dataclasses import dataclass

from .ids import MAX_ID_LENGTH
from .reasons import Kind
from .routes import RouteMatch

REQUEST_ID = "X-Request-ID"
MAX_REQUEST_ID = 128
_REQUEST_ID_FORM = rf"[A-Za-z0-9._~:;/+=@-]{{1,{MAX_REQUEST_ID}}}"
USABLE_REQUEST_ID = re.compile(_REQUEST_ID_FORM)
"""A request ID taken as the client sent it: what tracing systems mint (UUIDs, hex,
base64, `Root=…;Parent=…`), safe in a log line, a header and an exemplar. Any other
is replaced, as a missing one is."""
USABLE_REQUEST_ID_BYTES = re.compile(_REQUEST_ID_FORM.encode())


def short_id(session_id: str) -> str:
    """A session ID cut to a length fit to echo back or log."""
    return session_id if len(session_id) <= MAX_ID_LENGTH else session_id[:MAX_ID_LENGTH] + "…"


def new_request_id() -> str:
    """A request ID: not a secret, only unique, so no os.urandom per request."""
    return f"{random.getrandbits(128):032x}"


@dataclass(slots=True)
class Exchange:
    """What one request has become so far, for counting and logging."""

    kind: Kind
    target: str
    """The request target in origin form: path and query, as sent."""
    request_id: str
    id_generated: bool
    started: float
    match: RouteMatch | None = None
    invalid: bool = False
    """A lookup of a malformed ID, forwarded in observe mode: counted as `invalid` once."""
    status: int = 0
    upstream_seconds: float | None = None


def id_header(exchange: Exchange) -> list[tuple[str, str]]:
    """The request ID as a header of an answer, when the hop made it up."""
    return [(REQUEST_ID, exchange.request_id)] if exchange.id_generated else []


def ms_since(start: float) -> float:
    """Milliseconds since `start` (a `time.perf_counter()`), for a log line."""
    return round((time.perf_counter() - start) * 1000, 3)
