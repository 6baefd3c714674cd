"""What a person sees of an import: a progress bar on stderr, the summary, the exit code."""

import asyncio
import sys
from typing import TextIO

from tqdm import tqdm

from ..config import Config
from ..migrations import Progress
from .errors import ImportFailed, ImportUsage
from .options import Options
from .run import SHOWN_REFUSALS, Summary, run


def format_summary(summary: Summary, options: Options, interrupted: bool = False) -> str:
    """The summary as printed at the end: counts, then the refused rows."""
    verb = "would import" if options.dry_run else "imported"
    lines = [
        f"source         {options.label}",
        f"rows read      {summary.read:,}",
        f"{verb:<15}{summary.imported:,}",
        f"already known  {summary.known:,}",
        f"refused        {summary.refused:,}",
    ]
    if options.dry_run:
        lines.append("dry run: nothing was changed")
    if interrupted:
        lines.append(
            "interrupted: the pages counted above are committed; run the same command"
            " again to finish"
        )
    for where, why in summary.refusals:
        lines.append(f"  {where}: {why}".replace("\n", "\\n"))
    if summary.refused > SHOWN_REFUSALS:
        lines.append(f"  … and {summary.refused - SHOWN_REFUSALS:,} more")
    return "\n".join(lines)


class Bars:
    """The progress bars of a run, on stderr, closed before anything else is printed."""

    def __init__(self) -> None:
        self._bars: list[tqdm] = []

    def start(self, total: int | None, unit: str) -> Progress:
        """A new bar of `total` units (bytes are scaled); returns what advances it."""
        bar = tqdm(
            total=total, unit=unit, unit_scale=unit == "B", desc="import", file=sys.stderr,
            mininterval=0.5,
        )  # fmt: skip
        self._bars.append(bar)
        return bar.update  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close every bar, so that nothing printed after shares a line with one."""
        for bar in self._bars:
            bar.close()


def run_import(config: Config, options: Options, out: TextIO | None = None) -> int:
    """The `import` command: run, show progress on stderr and the summary; the exit code."""
    out = out or sys.stdout
    summary = Summary()
    bars = Bars()
    try:
        asyncio.run(run(config, options, summary, bars.start))
    except ImportUsage as exc:
        bars.close()
        print(f"session-lens: {exc}", file=sys.stderr)
        return 2
    except ImportFailed as exc:
        bars.close()
        if summary.read:
            print(format_summary(summary, options), file=out)
        kept = f"; the {summary.pages:,} pages before it are committed" if summary.pages else ""
        print(f"session-lens: {exc}{kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bars.close()
        print(format_summary(summary, options, interrupted=True), file=out)
        return 130
    bars.close()
    print(format_summary(summary, options), file=out)
    return 0
