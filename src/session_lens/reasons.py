"""The bounded vocabularies that label outcomes: reasons, outcomes, rules, kinds.

Every metric label and every `reason` in a response comes from one of these
enums, never from a request.
"""

from enum import StrEnum


class Reason(StrEnum):
    """Why a session lookup found nothing."""

    INVALID_FORMAT = "invalid_format"
    NEVER_EXISTED = "never_existed"
    CREATING = "creating"
    CREATION_FAILED = "creation_failed"
    DELETED = "deleted"
    DELETED_NOT_SERVED = "deleted_not_served"
    PURGED = "purged"
    ARCHIVED = "archived"
    NOT_YET_VISIBLE = "not_yet_visible"
    STORE_SUSPENDED = "store_suspended"
    UPSTREAM_INCONSISTENT = "upstream_inconsistent"
    EXPIRED = "expired"
    PREDATES_TRACKING = "predates_tracking"
    UNKNOWN = "unknown"


class Outcome(StrEnum):
    """What became of one lookup."""

    FOUND = "found"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    UPSTREAM_ERROR = "upstream_error"
    OTHER = "other"


class Rule(StrEnum):
    """The validation rule a malformed session ID broke."""

    MISSING = "missing"
    TOO_LONG = "too_long"
    PATTERN = "pattern"
    CALENDAR = "calendar"
    FUTURE = "future"


class Kind(StrEnum):
    """The kind of request, as counted."""

    LOOKUP = "lookup"
    LIFECYCLE = "lifecycle"
    PASSTHROUGH = "passthrough"


class UpstreamError(StrEnum):
    """How the upstream failed us."""

    CONNECT = "connect"
    RESET = "reset"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"


class StatusClass(StrEnum):
    """Status codes folded into classes, for bounded labels."""

    INFORMATIONAL = "1xx"
    SUCCESS = "2xx"
    REDIRECT = "3xx"
    CLIENT_ERROR = "4xx"
    SERVER_ERROR = "5xx"

    @classmethod
    def of(cls, status: int) -> "StatusClass":
        """The class of an HTTP status code."""
        return _CLASSES[min(max(status // 100, 1), 5) - 1]


_CLASSES = tuple(StatusClass)
