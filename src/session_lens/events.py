"""A lifecycle event seen in traffic, as a recorder spools it and writes it."""

import json
import random
import time
import uuid
from dataclasses import dataclass

from .routes import Action

MAX_AT = 253402300800.0
"""The first second of the year 10000: no event's time (seconds since the epoch) is later."""


def _plain(text: str) -> bool:
    """Whether JSON writes `text` as it is between its quotes."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


@dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle change the upstream confirmed (or a creation that did not complete)."""

    event_id: str
    session_id: str
    action: Action
    ok: bool
    at: float
    """When it happened: seconds since the epoch."""
    request_id: str
    detail: str | None = None

    @classmethod
    def new(
        cls,
        session_id: str,
        action: Action,
        request_id: str,
        ok: bool = True,
        detail: str | None = None,
        at: float | None = None,
    ) -> "Event":
        """An event that happened `at` (a `time.time()`), or now."""
        when = time.time() if at is None else at
        # 128 random bits, as a UUID's hex: unique, not secret, no system call per event.
        event_id = f"{random.getrandbits(128):032x}"
        return cls(event_id, session_id, action, ok, when, request_id, detail)

    def line(self) -> bytes:
        """The event as one spool line: a JSON array."""
        session_id, request_id = self.session_id, self.request_id
        if self.detail is None and _plain(session_id) and _plain(request_id):
            # What json.dumps writes for these fields, without its cost on every event.
            ok = "true" if self.ok else "false"
            text = f'["{self.event_id}","{session_id}","{self.action.value}",{ok},'
            return f'{text}{self.at!r},"{request_id}",null]\n'.encode()
        fields = [self.event_id, session_id, self.action.value, self.ok, self.at,
                  request_id, self.detail]  # fmt: skip
        return json.dumps(fields, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> "Event":
        """An event from its spool line; raises ValueError on a damaged one."""
        fields = json.loads(line)
        if not isinstance(fields, list) or len(fields) != 7:
            raise ValueError("not the seven fields of an event")
        event_id, session_id, action, ok, at, request_id, detail = fields
        texts = (event_id, session_id, action, request_id)
        if not all(isinstance(text, str) for text in texts) or not isinstance(ok, bool):
            raise ValueError("an event's field of the wrong type")
        if detail is not None and not isinstance(detail, str):
            raise ValueError("an event's detail that is not text")
        if isinstance(at, bool) or not isinstance(at, int | float) or not 0 <= at < MAX_AT:
            raise ValueError(f"an event's time that is no time: {at!r}"[:100])
        uuid.UUID(event_id)  # raises ValueError on a damaged one
        return cls(event_id, session_id, Action(action), ok, float(at), request_id, detail)
