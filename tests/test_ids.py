from datetime import UTC, datetime, timedelta

import pytest

from session_lens.ids import MAX_ID_LENGTH, IdValidator
from session_lens.reasons import Rule

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
validator = IdValidator(timedelta(hours=24))


@pytest.mark.parametrize(
    "session_id",
    [
        "exec_20251230_020944_4ad060d9",
        "exec_20240229_235959_00000000",  # leap day
        "exec_20260102_115959_abcdef01",  # within the skew allowance
    ],
)
def test_valid_ids_pass(session_id: str) -> None:
    assert validator.check(session_id, NOW) is None


@pytest.mark.parametrize(
    ("session_id", "rule"),
    [
        ("", Rule.MISSING),
        ("exec_20251230_020944_4ad060d9" + "0" * 40, Rule.TOO_LONG),
        ("x" * (MAX_ID_LENGTH + 1), Rule.TOO_LONG),
        ("exec_20251230_020944_4AD060D9", Rule.PATTERN),  # uppercase hex
        ("exec_20251230_020944_4ad060d", Rule.PATTERN),  # 7 hex digits
        ("exec_20251230_020944_4ad060d9 ", Rule.PATTERN),
        ("exec_2025123_020944_4ad060d9", Rule.PATTERN),
        ("sess_20251230_020944_4ad060d9", Rule.PATTERN),
        ("exec_20251230_020944_4ad060g9", Rule.PATTERN),
        ("exec_\uff120251230_020944_4ad060d9", Rule.PATTERN),  # a full-width digit
        ("exec_20251230_020944_4ad060d9\n", Rule.PATTERN),
        ("exec_20251330_020944_4ad060d9", Rule.CALENDAR),  # month 13
        ("exec_20250230_020944_4ad060d9", Rule.CALENDAR),  # Feb 30
        ("exec_20250229_020944_4ad060d9", Rule.CALENDAR),  # not a leap year
        ("exec_20251230_250944_4ad060d9", Rule.CALENDAR),  # hour 25
        ("exec_20251230_026044_4ad060d9", Rule.CALENDAR),  # minute 60
        ("exec_00001230_020944_4ad060d9", Rule.CALENDAR),  # year 0
        ("exec_20260102_120001_4ad060d9", Rule.FUTURE),  # just past now + 24 h
        ("exec_20991231_000000_4ad060d9", Rule.FUTURE),
    ],
)
def test_each_rule_is_named(session_id: str, rule: Rule) -> None:
    assert validator.check(session_id, NOW) is rule


def test_skew_is_configurable() -> None:
    strict = IdValidator(timedelta(0))
    assert strict.check("exec_20260101_120001_4ad060d9", NOW) is Rule.FUTURE
    assert strict.check("exec_20260101_120000_4ad060d9", NOW) is None


def test_default_clock_is_now() -> None:
    stamp = datetime.now(UTC) + timedelta(days=2)
    assert validator.check(stamp.strftime("exec_%Y%m%d_%H%M%S_0123abcd")) is Rule.FUTURE
