"""The ``quartchat`` command: ``serve`` and ``migrate``."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import Settings, _bind
from .errors import ConfigError
from .logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("quartchat")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quartchat", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="apply pending migrations, then serve (default)")
    serve.add_argument("--bind", help="HOST:PORT (overrides QUARTCHAT_BIND)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides QUARTCHAT_WORKERS)")
    sub.add_parser("migrate", help="alembic upgrade head on QUARTCHAT_DATABASE_URL")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    try:
        settings = Settings.from_env()
        overrides = {}
        if command == "serve" and args.bind:
            overrides["bind"] = _bind("--bind", args.bind)
        if command == "serve" and args.workers is not None:
            if args.workers < 1:
                raise ConfigError(f"--workers={args.workers}: must be >= 1")
            overrides["workers"] = args.workers
        if overrides:
            import attrs

            settings = attrs.evolve(settings, **overrides)
            settings.check()
    except ConfigError as exc:
        print(f"quartchat: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)

    from .migrate import upgrade_locked

    try:
        upgrade_locked(settings)
    except Exception as exc:
        log.error("migration failed on %s: %s", settings.database_url.split("@")[-1], exc)
        return 1
    if command == "migrate":
        log.info("database is at the newest schema")
        return 0

    if settings.workers == 1:
        from .server import run_worker

        log.info("serving on http://%s (ws://%s/chat)", settings.bind, settings.bind)
        run_worker(settings)
        return 0
    from .launcher import run_workers

    return run_workers(settings)
