"""`session-lens demo`, run as a user runs it: in a subprocess, on a terminal or into a file."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import free_port

CLI = [sys.executable, "-m", "session_lens"]
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES", "TERM")
"""What tells rich whether it writes to a terminal, and how large: each test says."""


def environment(**extra: str) -> dict[str, str]:
    """This environment without settings or terminal overrides, and `extra`."""
    kept = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SESSION_LENS_") and k not in TERMINAL_ENV
    }
    return {**kept, **extra}


@dataclass(frozen=True)
class Places:
    """Where a demo listens and keeps its data."""

    data_dir: Path
    listen: int
    admin: int
    service: int

    @classmethod
    def free(cls, data_dir: Path) -> "Places":
        return cls(data_dir, free_port(), free_port(), free_port())

    @property
    def flags(self) -> list[str]:
        return [
            "--listen", f"127.0.0.1:{self.listen}", "--admin-listen", f"127.0.0.1:{self.admin}",
            "--service-listen", f"127.0.0.1:{self.service}", "--data-dir", str(self.data_dir),
        ]  # fmt: skip


RATE = "is not a positive number of requests per second (from flag --rate)"


@pytest.mark.parametrize(
    ("flags", "problems"),
    [
        (["--rate", "0"], [f"rate: '0' {RATE}"]),
        (["--rate", "-1"], [f"rate: '-1' {RATE}"]),
        (["--rate", "nan"], [f"rate: 'nan' {RATE}"]),
        (["--duration", "0"], ["duration: '0' must be longer than zero (from flag --duration)"]),
        (["--duration", "-5"],
         ["duration: '-5' is out of range (0 to 366 days) (from flag --duration)"]),
        (["--duration", "10 seconds"],
         ["duration: '10 seconds' is not a duration (e.g. 500ms, 30s, 5m) (from flag --duration)"]),
        (
            ["--duration", "0s", "--rate", "-1", "--service-listen", "nope"],
            [
                "service_listen: 'nope' is not host:port (e.g. 127.0.0.1:8080)"
                " (from flag --service-listen)",
                "duration: '0s' must be longer than zero (from flag --duration)",
                f"rate: '-1' {RATE}",
            ],
        ),
    ],
)  # fmt: skip
def test_bad_flags_are_refused_in_one_line_each_before_anything_starts(
    tmp_path: Path, flags: list[str], problems: list[str]
) -> None:
    places = Places.free(tmp_path / "data")
    # A duration besides, so that a run of today's code, which took them, ends.
    argv = [*CLI, "demo", *places.flags, "--duration", "2", *flags]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=environment())
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"session-lens: {problem}" for problem in problems]
    assert result.stdout == ""
    assert not places.data_dir.exists()  # refused before the database started
