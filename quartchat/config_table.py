"""The table of settings: every ``QUARTCHAT_*`` variable, its default, parser and help.

The single source of truth for :class:`~quartchat.config.Settings.from_env`,
the settings table in the README and ``.env.example``. A row is (field,
variable, default as text, parser from :mod:`quartchat.config_values`, help).
"""

from __future__ import annotations

from typing import Final

from . import config_values as values

__all__ = ["EMPTY_IS_DEFAULT", "SPEC", "parser_of"]

SPEC: list[tuple[str, str, str, values.Parser, str]] = [
    (
        "database_url",
        "QUARTCHAT_DATABASE_URL",
        "sqlite+aiosqlite:///./quartchat.db",
        values.database_url,
        "Message store: sqlite+aiosqlite:///FILE or mysql+aiomysql://USER:PASS@HOST:PORT/DB",
    ),
    (
        "broker_url",
        "QUARTCHAT_BROKER_URL",
        "memory://",
        values.broker_url,
        (
            "Fan-out between processes: memory:// (one process), redis://HOST:PORT/DB, or "
            "redis+cluster://HOST:PORT[,HOST:PORT...] (a Redis Cluster, sharded pub/sub)"
        ),
    ),
    (
        "bind",
        "QUARTCHAT_BIND",
        "127.0.0.1:8080",
        values.bind,
        "HOST:PORT to listen on (`quartchat serve --bind` overrides)",
    ),
    (
        "server_id",
        "QUARTCHAT_SERVER_ID",
        "",
        values.identifier,
        "This server's id in welcome frames and presence (default: hostname + random suffix)",
    ),
    (
        "workers",
        "QUARTCHAT_WORKERS",
        "1",
        values.int_range(1, 64),
        "hypercorn worker processes (more than 1 needs a redis:// broker)",
    ),
    (
        "redis_prefix",
        "QUARTCHAT_REDIS_PREFIX",
        "quartchat",
        values.identifier,
        "Prefix of every Redis key and channel, so deployments can share one Redis",
    ),
    (
        "redis_pool_size",
        "QUARTCHAT_REDIS_POOL_SIZE",
        "32",
        values.int_range(2, 10_000),
        "Redis connections per process for commands (callers wait for a free one)",
    ),
    (
        "redis_timeout_s",
        "QUARTCHAT_REDIS_TIMEOUT_S",
        "5",
        values.float_range(0.1, 600),
        "Seconds a Redis command, a wait for a pooled connection or a publish may take",
    ),
    (
        "max_content",
        "QUARTCHAT_MAX_CONTENT",
        "4096",
        values.int_range(1, 1_048_576),
        "Largest message content in UTF-8 bytes",
    ),
    (
        "max_rooms",
        "QUARTCHAT_MAX_ROOMS",
        "100",
        values.int_range(1, 100_000),
        "Rooms one connection may have joined at once",
    ),
    (
        "rate_per_s",
        "QUARTCHAT_RATE_PER_S",
        "20",
        values.float_range(0),
        "Frames per second per connection (token bucket refill; 0 = no limit)",
    ),
    (
        "rate_burst",
        "QUARTCHAT_RATE_BURST",
        "40",
        values.int_range(1),
        "Token bucket size: frames a connection may send at once",
    ),
    (
        "outbound_queue",
        "QUARTCHAT_OUTBOUND_QUEUE",
        "1000",
        values.int_range(10, 1_000_000),
        "Frames queued to one socket before it is closed with 4008 (slow consumer)",
    ),
    (
        "room_inbox",
        "QUARTCHAT_ROOM_INBOX",
        "10000",
        values.int_range(10, 10_000_000),
        "Commands queued to one room actor before new posts get `unavailable`",
    ),
    (
        "history_max",
        "QUARTCHAT_HISTORY_MAX",
        "100",
        values.int_range(1, 100),
        "Largest `history` page and `join.history` replay",
    ),
    (
        "room_idle_s",
        "QUARTCHAT_ROOM_IDLE_S",
        "30",
        values.float_range(0),
        "Seconds a room actor with no local member lives before it is retired",
    ),
    (
        "batch_max",
        "QUARTCHAT_BATCH_MAX",
        "500",
        values.int_range(1, 10_000),
        "Most messages written to the store in one transaction",
    ),
    (
        "db_timeout_s",
        "QUARTCHAT_DB_TIMEOUT_S",
        "5",
        values.float_range(0.1, 600),
        "Seconds one database operation may take before it fails (a silent network partition)",
    ),
    (
        "gap_timeout_s",
        "QUARTCHAT_GAP_TIMEOUT_S",
        "0.2",
        values.float_range(0),
        "Seconds a message ahead of the expected seq waits before the gap is read from the store",
    ),
    (
        "position_check_s",
        "QUARTCHAT_POSITION_CHECK_S",
        "2",
        values.float_range(0.05, 3600),
        (
            "Seconds between checks of every active room against the store's newest seq "
            "(heals a lost last message)"
        ),
    ),
    (
        "drain_timeout_s",
        "QUARTCHAT_DRAIN_TIMEOUT_S",
        "10",
        values.float_range(0),
        "Seconds graceful shutdown waits for pending writes and socket flushes",
    ),
    (
        "allowed_origins",
        "QUARTCHAT_ALLOWED_ORIGINS",
        "*",
        values.origins,
        "Origins allowed to open a WebSocket (* = any; requests without Origin are allowed)",
    ),
    (
        "ws_compression",
        "QUARTCHAT_WS_COMPRESSION",
        "false",
        values.boolean,
        (
            "Accept permessage-deflate when a client offers it (every browser does); "
            "false: frames go uncompressed, built once per message for every socket"
        ),
    ),
    (
        "fast_writes",
        "QUARTCHAT_FAST_WRITES",
        "true",
        values.boolean,
        (
            "Frames go straight to the socket's transport as bytes built once per message "
            "when nothing is queued, and queued frames to hypercorn's WebSocket stream in "
            "one batch (false: one Quart send each)"
        ),
    ),
    (
        "event_loop",
        "QUARTCHAT_EVENT_LOOP",
        "auto",
        values.event_loop,
        "Event loop of server processes: auto (uvloop when installed), uvloop or asyncio",
    ),
    (
        "gc_threshold",
        "QUARTCHAT_GC_THRESHOLD",
        "10000,10,10",
        values.gc_threshold,
        (
            "Garbage collector thresholds G0,G1,G2 of server processes (`default`: Python's "
            "700,10,10); start-up objects are frozen out of collections either way. The "
            "larger default makes connect bursts 25 % faster; closed sockets are freed "
            "without the collector (`tcpfree`), so churn leaves no more behind"
        ),
    ),
    (
        "auth",
        "QUARTCHAT_AUTH",
        "none",
        values.auth_mode,
        (
            "Who may connect: none (sender_id is self-declared) "
            "or jwt (a signed token names the sender)"
        ),
    ),
    (
        "jwt_secret",
        "QUARTCHAT_JWT_SECRET",
        "",
        values.secret(32),
        "jwt mode: HMAC secret (HS256), at least 32 bytes; or set QUARTCHAT_JWT_PUBLIC_KEY",
    ),
    (
        "jwt_public_key",
        "QUARTCHAT_JWT_PUBLIC_KEY",
        "",
        values.optional,
        "jwt mode: path of a PEM public key (RS256, ES256 or EdDSA); or set QUARTCHAT_JWT_SECRET",
    ),
    (
        "jwt_algorithms",
        "QUARTCHAT_JWT_ALGORITHMS",
        "",
        values.algorithms,
        "jwt mode: accepted `alg` values, comma-separated (default: HS256, or the key's algorithm)",
    ),
    (
        "jwt_audience",
        "QUARTCHAT_JWT_AUDIENCE",
        "",
        values.optional,
        "jwt mode: required `aud` (unset: a token carrying `aud` is refused)",
    ),
    ("jwt_issuer", "QUARTCHAT_JWT_ISSUER", "", values.optional, "jwt mode: required `iss`"),
    (
        "jwt_leeway_s",
        "QUARTCHAT_JWT_LEEWAY_S",
        "10",
        values.float_range(0, 300),
        "jwt mode: clock skew allowed on exp, nbf and iat, in seconds",
    ),
    (
        "api_key",
        "QUARTCHAT_API_KEY",
        "",
        values.secret(16),
        "Enables the server API (publish, disconnect, kick) for this bearer key, at least 16 bytes",
    ),
    ("log_level", "QUARTCHAT_LOG_LEVEL", "info", values.log_level, "Log level"),
    ("log_json", "QUARTCHAT_LOG_JSON", "false", values.boolean, "Log one JSON object per line"),
]

# Settings whose empty value (`.env.example` shows them as `VAR=`) means the default.
EMPTY_IS_DEFAULT: Final = frozenset({"server_id", "jwt_algorithms"})


def parser_of(field: str) -> values.Parser:
    """The parser of one setting (a command-line override is checked the same way)."""
    return next(parse for name, _, _, parse, _ in SPEC if name == field)
