"""The ``quartchat`` command: ``serve``, ``migrate`` and ``token`` (a development token)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .config import Settings
from .config_table import parser_of
from .config_values import bind, int_range
from .errors import ConfigError
from .logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("quartchat")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quartchat", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="apply pending migrations, then serve (default)")
    serve.add_argument("--bind", help="HOST:PORT (overrides QUARTCHAT_BIND)")
    serve.add_argument("--workers", help="worker processes (overrides QUARTCHAT_WORKERS)")
    sub.add_parser("migrate", help="alembic upgrade head on QUARTCHAT_DATABASE_URL")
    token = sub.add_parser(
        "token", help="print a development token signed with QUARTCHAT_JWT_SECRET (auth mode jwt)"
    )
    token.add_argument("sub", help="the sender id the token names")
    token.add_argument(
        "--rooms",
        help="comma-separated room patterns to join and read "
        "(e.g. 'team-1:*'; default: every room)",
    )
    token.add_argument(
        "--publish",
        help="comma-separated room patterns to post to "
        "(default: same as --rooms; '' for read-only)",
    )
    token.add_argument("--ttl", default="3600", help="seconds until it expires (3600)")
    return parser


def _patterns(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def _token(args: argparse.Namespace) -> int:
    """Mint a token with the configured secret (and audience / issuer, when set)."""
    from .auth import AuthError, mint_token

    try:
        settings = Settings.from_env({**os.environ, "QUARTCHAT_AUTH": "jwt"})
        if settings.jwt_secret is None:
            raise ConfigError(
                "QUARTCHAT_JWT_SECRET is not set: `quartchat token` signs with "
                "the HMAC secret (with a public key, tokens come from your backend)"
            )
        ttl = int_range(1)("--ttl", args.ttl)
        algorithm = settings.jwt_algorithms[0] if settings.jwt_algorithms else "HS256"
        token = mint_token(
            settings.jwt_secret,
            args.sub,
            ttl_s=ttl,
            rooms=_patterns(args.rooms),
            publish=_patterns(args.publish),
            algorithm=algorithm,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
        from .auth import TokenVerifier

        TokenVerifier.from_settings(settings).verify(token)  # e.g. a sub the server refuses
    except ConfigError as exc:
        print(f"quartchat: configuration error: {exc}", file=sys.stderr)
        return 2
    except AuthError as exc:
        print(f"quartchat: cannot mint this token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "token":
        return _token(args)
    try:
        settings = Settings.from_env()
        overrides: dict[str, Any] = {}
        if command == "serve" and args.bind:
            overrides["bind"] = bind("--bind", args.bind)
        if command == "serve" and args.workers is not None:
            overrides["workers"] = parser_of("workers")("--workers", args.workers)
        if overrides:
            import attrs

            settings = attrs.evolve(settings, **overrides)
            settings.check()
        if command == "serve":
            from .server import hypercorn_config

            hypercorn_config(settings)  # a named settings file that is missing stops here
    except ConfigError as exc:
        print(f"quartchat: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)

    from .migrate import MIGRATION_ERRORS, upgrade_locked

    try:
        upgrade_locked(settings)
    except MIGRATION_ERRORS as exc:
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
