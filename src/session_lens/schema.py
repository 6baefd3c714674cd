"""The lifecycle model: states, the moves between them, and the tables that hold them."""

from dataclasses import dataclass
from enum import StrEnum


class SessionState(StrEnum):
    """Where a session is in its life."""

    CREATING = "CREATING"
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    STOPPED = "STOPPED"
    DELETED = "DELETED"
    ARCHIVED = "ARCHIVED"


S = SessionState
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.CREATING: frozenset({S.ACTIVE}),
    S.ACTIVE: frozenset({S.PAUSED, S.STOPPED}),
    S.PAUSED: frozenset({S.ACTIVE, S.STOPPED}),
    S.STOPPED: frozenset({S.DELETED, S.ARCHIVED}),
    S.DELETED: frozenset({S.STOPPED, S.ARCHIVED}),
    S.ARCHIVED: frozenset(),
}
"""The design's diagram: state -> the states one move can reach."""

LIVE_STATES = frozenset({S.ACTIVE, S.PAUSED, S.STOPPED})
AUDIT_TABLE = "session_audit"
AUDIT_TIME_INDEX = "session_audit_occurred_at_idx"
EVENTS_TIME_INDEX = "session_lens_events_occurred_at_idx"


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted; `schema.table` is quoted part by part."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


@dataclass(frozen=True, slots=True)
class Tables:
    """The names of the lifecycle tables, as configured, quoted once."""

    sessions: str = "sessions"
    id_column: str = "id"

    @property
    def schema(self) -> str | None:
        """The sessions table's schema, when one is named."""
        return self.sessions.split(".")[0] if "." in self.sessions else None

    @property
    def names(self) -> dict[str, str]:
        """Quoted identifiers to format SQL templates with."""
        prefix = f"{self.schema}." if self.schema else ""
        return {
            "table": quote_ident(self.sessions),
            "id": quote_ident(self.id_column),
            "audit": quote_ident(prefix + AUDIT_TABLE),
            "fn": quote_ident(prefix + "session_lens_audit"),
            "guard": quote_ident(prefix + "session_lens_guard"),
            "append_only": quote_ident(prefix + "session_lens_append_only"),
            "versions": quote_ident(prefix + "session_lens_migrations"),
            "events": quote_ident(prefix + "session_lens_events"),
            "record": quote_ident(prefix + "session_lens_record"),
            "record_batch": quote_ident(prefix + "session_lens_record_batch"),
            "record_events": quote_ident(prefix + "session_lens_record_events"),
            "tracking": quote_ident(prefix + "session_lens_tracking"),
            "replays": quote_ident(prefix + "session_lens_replays"),
            "audit_session_idx": quote_ident(prefix + "session_audit_session_id_idx"),
            "delete_guard": quote_ident(prefix + "session_lens_audit_delete_guard"),
            "prune_guard": quote_ident(prefix + "session_lens_audit_prune_guard"),
            # Index names, bare: an index lives in its table's schema.
            "audit_time_idx": quote_ident(AUDIT_TIME_INDEX),
            "events_time_idx": quote_ident(EVENTS_TIME_INDEX),
            "states": ", ".join(f"'{state.value}'" for state in SessionState),
            "transitions": ", ".join(
                f"'{old.value}>{new.value}'"
                for old, targets in TRANSITIONS.items()
                for new in targets
            ),
        }
