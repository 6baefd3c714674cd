"""The `session-lens` command: argv → config → run."""

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__
from .config import (
    SETTINGS,
    Config,
    ConfigError,
    LogLevel,
    Problem,
    check_text,
    describe,
    did_you_mean,
    env_name,
    file_source,
    load_config,
    parse_address,
    parse_database_url,
    parse_duration,
    positive_duration,
    read_file,
    settings_for,
    stray_variables,
)
from .demo import DemoOptions, run_demo
from .embedded import EmbeddedError, start_embedded
from .evidence.replay import given_reason, moment
from .evidence.retention import Period
from .importer import ImportUsage, add_arguments, options_from, run_import
from .logs import setup_logging
from .migrations import BATCH_SIZE as MIGRATE_BATCH
from .operate import (
    Batches,
    DatabaseError,
    TriageOptions,
    questdb_found,
    run_explain,
    run_migrations,
    run_prune,
    run_triage,
)
from .prune import BATCH_SIZE
from .recorder import SpoolError
from .server import ListenError, run_fast, serve
from .triage import Fields, dotted, inputs_readable
from .workers import WorkersFailed, supervise

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130


class BadFlag(Exception):
    """A flag of a command's own (not a setting) whose value cannot be used."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


class _Parser(argparse.ArgumentParser):
    """argparse's parser, saying what is wrong in one line and naming the flag meant.

    Abbreviations are off: a prefix taken for the one flag it starts would stop
    working the day a setting of the same start is added, and a flag mistyped as
    such a prefix would be taken without a word.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's, but a flag this parser does not know is refused here, where
        the command's own flags are known to say which one was meant."""
        known, extras = super().parse_known_args(args, namespace)
        flags = [option for action in self._actions for option in action.option_strings]
        for extra in extras:
            if extra.startswith("-"):
                flag = extra.partition("=")[0]
                self.error(f"{flag}: unknown flag{did_you_mean(flag, flags)}")
        return known, extras

    def error(self, message: str) -> NoReturn:
        """The problem in one line, not after the usage (serve's runs to 50 lines)."""
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _settings(command: str | None = None) -> _Parser:
    """The flags a command takes: --config and one per setting it uses."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML file of settings (or {env_name('config')})",
    )
    for setting in settings_for(command) if command else SETTINGS:
        common.add_argument(
            setting.flag,
            dest=setting.name,
            metavar="VALUE",
            help=f"{setting.help_line}; env {setting.env}",
        )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _settings()
    parser = _Parser(
        prog="session-lens",
        description="A sidecar HTTP proxy that explains why a session was not found.",
    )
    parser.add_argument("--version", action="version", version=f"session-lens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the proxy")
    migrate = commands.add_parser(
        "migrate",
        parents=[_settings("migrate")],
        help="bring the sessions table up to the lifecycle model",
    )
    migrate.add_argument(
        "--dry-run", action="store_true",
        help="print each step, the lock it takes, its SQL and the batches; change nothing",
    )  # fmt: skip
    migrate.add_argument(
        "--batch-size", type=_positive, default=MIGRATE_BATCH, metavar="N",
        help=f"rows backfilled per transaction (default {MIGRATE_BATCH:,})",
    )  # fmt: skip
    migrate.add_argument(
        "--batch-pause", default="0", metavar="DURATION",
        help="pause between backfill batches, for the service's latency: 50ms, 1s (default 0)",
    )  # fmt: skip
    explain = commands.add_parser(
        "explain",
        parents=[_settings("explain")],
        help="the state, audit timeline and reason for one ID",
    )
    explain.add_argument("session_id", metavar="SESSION_ID")
    explain.add_argument(
        "--at",
        metavar="TIME",
        help="the moment of a miss (ISO 8601, or Unix milliseconds): the evidence as it stood then",
    )
    explain.add_argument(
        "--given", metavar="REASON", help="with --at: the reason that miss was given"
    )
    add_arguments(
        commands.add_parser(
            "import",
            parents=[_settings("import")],
            help="observed mode: seed the lifecycle store with the sessions the service has",
        )
    )
    _add_prune(
        commands.add_parser(
            "prune",
            parents=[_settings("prune")],
            help="remove audit entries older than a period, the tracking horizon moved first",
        )
    )
    _add_triage(
        commands.add_parser(
            "triage",
            parents=[_settings("triage")],
            help="read a service's log lines of misses and say what they have in common",
        )
    )
    _add_demo(
        commands.add_parser(
            "demo",
            parents=[common],
            help="see it work: a faulty session service, session-lens in front, live reasons",
        )
    )
    commands.add_parser(
        "check-config",
        parents=[common],
        help="print the effective configuration, or what is wrong with it",
    )
    return parser


def _add_prune(prune: argparse.ArgumentParser) -> None:
    prune.add_argument(
        "--older-than", required=True, metavar="PERIOD",
        help="what to remove: older than 30m, 36h, 90d, 12w, 6M, 1y (M months, m minutes)",
    )  # fmt: skip
    prune.add_argument(
        "--batch-size", type=_positive, default=BATCH_SIZE, metavar="N",
        help=f"entries removed per transaction (default {BATCH_SIZE:,})",
    )  # fmt: skip
    prune.add_argument(
        "--dry-run", action="store_true", help="print the cut-off and the counts, change nothing"
    )


def _add_triage(triage: argparse.ArgumentParser) -> None:
    triage.add_argument(
        "files", nargs="+", metavar="FILE",
        help="JSON-lines log files (- for stdin; gzip read as it is)",
    )  # fmt: skip
    triage.add_argument("--json", action="store_true", help="print the report as JSON")
    triage.add_argument("--html", metavar="FILE", help="also write the report as one HTML page")
    triage.add_argument(
        "--event-field", default="event_type", metavar="PATH",
        help="dotted path of the event name (default event_type)",
    )  # fmt: skip
    triage.add_argument(
        "--event-suffix", default="session_not_found", metavar="TEXT",
        help="what a miss's event name ends with (default session_not_found)",
    )  # fmt: skip
    triage.add_argument(
        "--id-field", default="data.session_id", metavar="PATH",
        help="dotted path of the session ID (default data.session_id)",
    )  # fmt: skip
    triage.add_argument(
        "--include-deleted-field", default="data.include_deleted", metavar="PATH",
        help="dotted path of include_deleted (default data.include_deleted)",
    )  # fmt: skip
    triage.add_argument(
        "--time-field", metavar="PATH",
        help="dotted path of the time (default: the first of timestamp, time, ts, @timestamp)",
    )  # fmt: skip
    triage.add_argument(
        "--top", type=_positive, default=10, metavar="N", help="IDs listed (default 10)"
    )


def _triage_options(args: argparse.Namespace) -> TriageOptions:
    """The triage's own flags, checked; raises BadFlag naming the first bad one."""
    paths = {
        name: _own(f"--{name.replace('_', '-')}", dotted, getattr(args, name))
        for name in ("event_field", "id_field", "include_deleted_field")
    }
    times = (
        (_own("--time-field", dotted, args.time_field),)
        if args.time_field is not None
        else Fields().time
    )
    if not args.event_suffix:
        raise BadFlag("--event-suffix", "must not be empty")
    fields = Fields(
        paths["event_field"], args.event_suffix, paths["id_field"],
        paths["include_deleted_field"], times,
    )  # fmt: skip
    missing = inputs_readable(args.files)
    if missing:
        raise BadFlag("FILE", "; ".join(missing))
    html = Path(args.html) if args.html else None
    return TriageOptions(args.files, fields, args.json, html, args.top)


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--duration", metavar="DURATION",
        help="stop after this long: 20s, 5m, 1h30m, or seconds (default: until Ctrl-C)",
    )  # fmt: skip
    demo.add_argument("--rate", default="50", metavar="N", help="requests per second (default 50)")
    demo.add_argument(
        "--service-listen", default="127.0.0.1:8000", metavar="HOST:PORT",
        help="where the reference session service listens (default 127.0.0.1:8000)",
    )  # fmt: skip
    demo.add_argument("--seed", type=int, help="seed of the traffic generator")
    demo.add_argument(
        "--questdb", metavar="URL",
        help="keep the reference service's sessions in this QuestDB (its PostgreSQL wire URL,"
        " e.g. postgresql://admin:quest@127.0.0.1:8812/qdb) instead of the embedded PostgreSQL",
    )  # fmt: skip


def _demo_options(args: argparse.Namespace) -> DemoOptions:
    """The demo's own flags, checked before anything starts; raises ConfigError naming each."""
    parsers: dict[str, Callable[[str], Any]] = {
        "service_listen": parse_address,
        "duration": _demo_duration,
        "rate": _demo_rate,
        "questdb": parse_database_url,
    }
    values: dict[str, Any] = {}
    problems = []
    for name, parse in parsers.items():
        raw = getattr(args, name)
        try:
            if raw is not None:
                check_text(raw)
            values[name] = None if raw is None else parse(raw)
        except ValueError as exc:
            problems.append(Problem(name, f"flag --{name.replace('_', '-')}", str(exc)))
    if problems:
        raise ConfigError(problems)
    return DemoOptions(
        values["duration"], values["rate"], values["service_listen"], args.seed, values["questdb"]
    )


def _demo_duration(text: str) -> float:
    """Seconds, from a duration as every setting takes it (`90s`, `5m`, `1h30m`, `20`)."""
    return positive_duration(text).total_seconds()


def _demo_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{text!r} is not a positive number of requests per second")
    return rate


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _period(text: str) -> Period | timedelta:
    """What to prune by; raises ValueError.

    A duration as every setting takes it (`30m`, `36h`, `1h30m`), or a calendar
    period (`90d`, `12w`, `6M`, `1y`) that reaches back to a date that exists.
    """
    try:
        return parse_duration(text)
    except ValueError:
        pass
    period = Period.parse(text)
    try:
        period.before(datetime.now(UTC))
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{text!r} reaches back before the year 1") from exc
    return period


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """The configuration from the parsed flags, the environment and the config file."""
    path = args.config or (
        Path(environ[env_name("config")]) if environ.get(env_name("config")) else None
    )
    file: dict[str, Any] = read_file(path) if path else {}
    flags = {setting.name: getattr(args, setting.name, None) for setting in SETTINGS}
    return load_config(
        file=file,
        file_name=file_source(path) if path else "config file",
        environ=environ,
        flags=flags,
        need_upstream=args.command in ("serve", "check-config"),
    )


Command = Callable[[Config], int]
"""A command as it runs, given the configuration with its database in place."""


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    for warning in stray_variables(environ):
        print(f"session-lens: warning: {warning}", file=sys.stderr)
    try:
        config = resolve_config(args, environ)
        command = _command(args, config)
    except (ImportUsage, BadFlag) as exc:
        print(f"session-lens: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"session-lens: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(describe(config))
        found = asyncio.run(questdb_found(config))
        if found is not None:
            print(found)
        return 0
    quiet_demo = args.command == "demo" and config.sources.get("log_level") == "default"
    setup_logging(LogLevel.WARNING if quiet_demo else config.log_level)
    try:
        return command(_with_database(args.command, config))
    except (ListenError, EmbeddedError, DatabaseError, WorkersFailed, SpoolError) as exc:
        print(f"session-lens: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        # prune and migrate said how far they got
        return EXIT_INTERRUPTED if args.command in ("prune", "migrate") else 0


Parsed = TypeVar("Parsed")


def _own(flag: str, parse: Callable[[str], Parsed], text: str) -> Parsed:
    """The value of a command's own flag; raises BadFlag naming the flag."""
    try:
        check_text(text)
        return parse(text)
    except ValueError as exc:
        raise BadFlag(flag, str(exc)) from None


def _command(args: argparse.Namespace, config: Config) -> Command:
    """The command to run, its own flags checked; raises BadFlag or ImportUsage."""
    match args.command:
        case "migrate":
            batches = Batches(
                args.batch_size, _own("--batch-pause", parse_duration, args.batch_pause)
            )
            return lambda ready: asyncio.run(
                run_migrations(ready, dry_run=args.dry_run, batches=batches)
            )
        case "explain":
            at = None if args.at is None else _own("--at", moment, args.at)
            given = None if args.given is None else _own("--given", given_reason, args.given)
            if given is not None and at is None:
                raise BadFlag("--given", "goes with --at, the moment of the miss")
            return lambda ready: asyncio.run(run_explain(ready, args.session_id, at, given))
        case "import":
            importing = options_from(args, config)
            return lambda ready: run_import(ready, importing)
        case "prune":
            older_than = _own("--older-than", _period, args.older_than)
            return lambda ready: asyncio.run(
                run_prune(ready, older_than, batch_size=args.batch_size, dry_run=args.dry_run)
            )
        case "triage":
            triaging = _triage_options(args)
            return lambda ready: asyncio.run(run_triage(ready, triaging))
        case "demo":
            options = _demo_options(args)
            return lambda ready: asyncio.run(run_demo(ready, options))
    return _serve


def _serve(config: Config) -> int:
    run_fast(supervise(config) if config.workers > 1 else serve(config))
    return 0


def _with_database(command: str, config: Config) -> Config:
    """The configuration with a database: without `database_url`, the embedded one."""
    if command == "demo":
        config = replace(config, data_dir=config.data_dir / "demo", database_url=None)
    if config.database_url is None:
        embedded = start_embedded(config.data_dir)
        config = replace(config, database_url=embedded.url)
        if command != "migrate":  # zero setup: the embedded database is always migrated
            asyncio.run(run_migrations(config, quiet=True))
    return config


if __name__ == "__main__":
    sys.exit(main())
