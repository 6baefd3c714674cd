"""`session-lens demo`, run as a user runs it: in a subprocess, on a terminal or into a file."""

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from session_lens.config import Address
from session_lens.demo import read_metrics

from .conftest import free_port

CLI = [sys.executable, "-m", "session_lens"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
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


async def until_misses(places: Places, process: "subprocess.Popen[bytes]", count: int) -> None:
    """Wait until the running demo's session-lens has counted `count` misses."""
    deadline = time.monotonic() + 60
    admin = Address("127.0.0.1", places.admin)
    async with aiohttp.ClientSession() as client:
        while True:
            assert process.poll() is None, "the demo ended too soon"
            assert time.monotonic() < deadline, "the demo counted no miss"
            with contextlib.suppress(aiohttp.ClientError):
                if (await read_metrics(client, admin)).get("not_found", 0) >= count:
                    return
            await asyncio.sleep(0.1)


def peak_rss_mib(process: "subprocess.Popen[bytes]") -> float:
    """The process's peak resident memory, watched until it ends."""
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(OSError, StopIteration):  # ended meanwhile
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            peak = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
        time.sleep(0.2)
    return peak / 1024


def explain_command(out: str) -> list[str]:
    """The `explain` command the summary prints, as a shell would split it."""
    lines = out.splitlines()
    return shlex.split(lines[lines.index("Look at any of them with:") + 1])


def run_as_printed(command: list[str]) -> None:
    """Run a printed command where the venv is not activated: no PATH to it."""
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(PATH="/usr/bin:/bin"),
    )
    assert result.returncode == 0, result.stderr
    session_id = command[command.index("explain") + 1]
    assert result.stdout.startswith(f"session   {session_id}\n")


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


def test_a_questdb_it_cannot_reach_is_said_in_one_line(tmp_path: Path) -> None:
    url = "postgresql://admin:s3cret@127.0.0.1:1/qdb"
    done = subprocess.run(
        [*CLI, "demo", "--questdb", url, "--data-dir", str(tmp_path), "--duration", "5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(
        "session-lens: cannot reach QuestDB at postgresql://admin:***@127.0.0.1:1/qdb:"
    )
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr + done.stdout


async def test_until_ctrl_c_ends_with_the_summary_and_exit_0(tmp_path: Path) -> None:
    places = Places.free(tmp_path / "data")
    terminal = environment(TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="120", LINES="50")
    demo = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [*CLI, "demo", *places.flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=terminal
    )
    try:
        await until_misses(places, demo, 3)
        # Soon: upstream_inconsistent needs a session older than the 2.5 s window.
        demo.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(demo.communicate, timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    text = ANSI.sub("", out.decode())
    assert demo.returncode == 0, text[-2000:] + err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    assert "runs until Ctrl-C" in text  # what the live table said while it ran
    assert "not-found reasons seen" in text
    assert "upstream_inconsistent" in text.split("not seen this time: ")[1]
    command = explain_command(text)
    assert command[:4] == [sys.executable, "-m", "session_lens", "explain"]
    # judged with the demo's own window, as the hop judged its misses
    assert command[command.index("--visibility-window") + 1] == "2.5s"
    run_as_printed(command)


async def test_into_a_file_beside_a_second_demo(tmp_path: Path) -> None:
    launcher = tmp_path / "a venv" / "bin" / "session-lens"  # as pip writes it, run by its path
    launcher.parent.mkdir(parents=True)
    launcher.write_text(
        f"#!{sys.executable}\nimport sys\nfrom session_lens.cli import main\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)
    places = Places.free(tmp_path / "data")  # no space: pgserver cannot start there
    output = tmp_path / "demo.txt"
    with output.open("wb") as file:
        # Far more requests per second than the machine can send.
        first = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [str(launcher), "demo", "--duration", "6s", "--rate", "1e6", *places.flags],
            stdout=file, stderr=subprocess.PIPE, env=environment(),
        )  # fmt: skip
    try:
        await until_misses(places, first, 1)
        second = await asyncio.to_thread(
            subprocess.run,
            [*CLI, "demo", "--duration", "1", *places.flags],
            capture_output=True, text=True, timeout=60, env=environment(),
        )  # fmt: skip
        peak_mib = await asyncio.to_thread(peak_rss_mib, first)
        _, err = await asyncio.to_thread(first.communicate, timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert (second.returncode, second.stderr) == (
        1,
        f"session-lens: cannot listen on 127.0.0.1:{places.service}: Address already in use\n",
    )
    text = output.read_text()
    assert first.returncode == (0 if "every reason appeared" in text else 1), err.decode()
    assert "Traceback" not in err.decode()
    assert "\x1b" not in text
    lines = [line.strip() for line in text.splitlines()]
    assert lines.count("not-found reasons seen") == 1  # the summary's title, on a line of its own
    assert peak_mib < 150, f"the demo grew to {peak_mib:.0f} MiB"
    command = explain_command(text)
    assert command[:2] == [str(launcher), "explain"]
    run_as_printed(command)
