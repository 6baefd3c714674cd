"""The `session-lens` command: argv → config → run."""

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import SETTINGS, Config, ConfigError, describe, env_name, load_config, read_file
from .logs import setup_logging
from .server import ListenError, serve

EXIT_CONFIG = 2
EXIT_RUNTIME = 1

_FLAG_HELP = {
    "upstream": "base URL of the session service (required)",
    "listen": "proxy listener, host:port (default 127.0.0.1:8080)",
    "admin_listen": "admin listener for /metrics, /healthz, /readyz (default 127.0.0.1:9464)",
    "database_url": "PostgreSQL URL of the lifecycle tables",
    "validation": "enforce: answer malformed IDs here; observe: forward and count them",
    "invalid_status": "status for a malformed ID: 404 (default), 400 or 422",
    "session_routes": "comma-separated path templates with {session_id}",
    "max_future_skew": "how far in the future an ID's timestamp may lie (default 24h)",
    "upstream_connect_timeout": "time to open an upstream connection (default 5s)",
    "upstream_read_timeout": "longest silence from the upstream while reading (default 60s)",
    "shutdown_grace": "time in-flight requests get to finish on shutdown (default 10s)",
    "log_level": "debug, info, warning or error (default info)",
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML file of settings (or {env_name('config')})",
    )
    for setting in SETTINGS:
        common.add_argument(
            "--" + setting.replace("_", "-"),
            dest=setting,
            metavar="VALUE",
            help=f"{_FLAG_HELP[setting]}; env {env_name(setting)}",
        )
    parser = argparse.ArgumentParser(
        prog="session-lens",
        description="A sidecar HTTP proxy that explains why a session was not found.",
    )
    parser.add_argument("--version", action="version", version=f"session-lens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the proxy")
    commands.add_parser(
        "check-config",
        parents=[common],
        help="print the effective configuration, or what is wrong with it",
    )
    return parser


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """The configuration from the parsed flags, the environment and the config file."""
    path = args.config or (
        Path(environ[env_name("config")]) if environ.get(env_name("config")) else None
    )
    file: dict[str, Any] = read_file(path) if path else {}
    flags = {setting: getattr(args, setting) for setting in SETTINGS}
    return load_config(file=file, file_name=f"file {path}", environ=environ, flags=flags)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    try:
        config = resolve_config(args, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"session-lens: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(describe(config))
        return 0
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except ListenError as exc:
        print(f"session-lens: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
