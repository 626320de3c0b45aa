"""Settings: read once from the environment (and a ``.env`` file), frozen, failing fast.

Every setting is a ``QUARTCHAT_*`` variable with a default that runs the
embedded mode (SQLite in the working directory, the in-process broker). A bad
value raises :class:`ConfigError` naming the variable and the value. Tests
pass a mapping to :meth:`Settings.from_env` instead of patching ``os.environ``.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from .errors import ConfigError
from .validate import (
    INT_MAX,
    is_database_url,
    is_redis_cluster_url,
    is_redis_url,
    parse_int,
    valid_name,
)

__all__ = ["SETTINGS_DOC", "Settings", "load_env_file"]

T = TypeVar("T")

_BIND_RE = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def _int(lo: int, hi: int = INT_MAX) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            return parse_int(name, raw, lo, hi)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r}: {exc}") from None

    return parse


def _float(lo: float, hi: float | None = None) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
        if not (value >= lo) or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{name}={raw!r}: must be {bound}")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _database_url(name: str, raw: str) -> str:
    url = raw.strip()
    if is_database_url(url):
        return url
    if url.startswith(("mysql://", "mysql+pymysql://", "sqlite://")):
        raise ConfigError(
            f"{name}={raw!r}: write the async driver explicitly, "
            "sqlite+aiosqlite:///path or mysql+aiomysql://user:pass@host/db"
        )
    raise ConfigError(
        f"{name}={raw!r}: unsupported database URL (use sqlite+aiosqlite:// or mysql+aiomysql://)"
    )


def _broker_url(name: str, raw: str) -> str:
    url = raw.strip()
    if is_redis_cluster_url(url):
        from .broker.redis_cluster import parse_cluster_url

        try:
            parse_cluster_url(url)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        return url
    if url == "memory://" or is_redis_url(url):
        return url
    raise ConfigError(
        f"{name}={raw!r}: unsupported broker URL "
        "(use memory://, redis://host:port/db or redis+cluster://host:port[,host:port...])"
    )


def _bind(name: str, raw: str) -> str:
    bind = raw.strip()
    match = _BIND_RE.fullmatch(bind)
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ConfigError(f"{name}={raw!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return bind


def _server_id(name: str, raw: str) -> str:
    value = raw.strip()
    if not valid_name(value):
        raise ConfigError(f"{name}={raw!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    return value


def _prefix(name: str, raw: str) -> str:
    value = raw.strip()
    if not valid_name(value):
        raise ConfigError(f"{name}={raw!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    return value


def _origins(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not items:
        raise ConfigError(f"{name}={raw!r}: give * or a comma-separated list of origins")
    return items


def _log_level(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"{name}={raw!r}: one of debug, info, warning, error, critical")
    return value


def _event_loop(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"auto", "uvloop", "asyncio"}:
        raise ConfigError(f"{name}={raw!r}: one of auto, uvloop, asyncio")
    if value == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ConfigError(f"{name}={raw!r}: uvloop is not installed") from None
    return value


def _auth(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"none", "jwt"}:
        raise ConfigError(f"{name}={raw!r}: one of none, jwt")
    return value


def _secret(min_bytes: int) -> Callable[[str, str], str | None]:
    # The value of a secret is never repeated in a message, not even a bad one.
    def parse(name: str, raw: str) -> str | None:
        value = raw.strip()
        if not value:
            return None
        if len(value.encode()) < min_bytes:
            raise ConfigError(f"{name}: too short, at least {min_bytes} bytes (value not shown)")
        return value

    return parse


def _optional(name: str, raw: str) -> str | None:
    return raw.strip() or None


def _algorithms(name: str, raw: str) -> tuple[str, ...]:
    from .auth import HMAC_ALGORITHMS, KEY_ALGORITHMS

    known = {a.lower(): a for a in (*HMAC_ALGORITHMS, *KEY_ALGORITHMS)}
    items = [item.strip() for item in raw.split(",") if item.strip()]
    algorithms = []
    for item in items:
        if item.lower() == "none":
            raise ConfigError(f"{name}={raw!r}: `none` (unsigned tokens) is never accepted")
        if item.lower() not in known:
            raise ConfigError(
                f"{name}={raw!r}: unknown algorithm {item!r}; use one of "
                f"{', '.join(sorted(known.values()))}"
            )
        algorithms.append(known[item.lower()])
    return tuple(algorithms)


def _default_server_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "server"
    return f"{host}-{uuid.uuid4().hex[:8]}"


# (field, variable, default as text, parser, help). The single source of truth
# for the settings table in the README and `.env.example`.
_SPEC: list[tuple[str, str, str, Callable[[str, str], Any], str]] = [
    (
        "database_url",
        "QUARTCHAT_DATABASE_URL",
        "sqlite+aiosqlite:///./quartchat.db",
        _database_url,
        "Message store: sqlite+aiosqlite:///FILE or mysql+aiomysql://USER:PASS@HOST:PORT/DB",
    ),
    (
        "broker_url",
        "QUARTCHAT_BROKER_URL",
        "memory://",
        _broker_url,
        (
            "Fan-out between processes: memory:// (one process), redis://HOST:PORT/DB, or "
            "redis+cluster://HOST:PORT[,HOST:PORT...] (a Redis Cluster, sharded pub/sub)"
        ),
    ),
    (
        "bind",
        "QUARTCHAT_BIND",
        "127.0.0.1:8080",
        _bind,
        "HOST:PORT to listen on (`quartchat serve --bind` overrides)",
    ),
    (
        "server_id",
        "QUARTCHAT_SERVER_ID",
        "",
        _server_id,
        "This server's id in welcome frames and presence (default: hostname + random suffix)",
    ),
    (
        "workers",
        "QUARTCHAT_WORKERS",
        "1",
        _int(1, 64),
        "hypercorn worker processes (more than 1 needs a redis:// broker)",
    ),
    (
        "redis_prefix",
        "QUARTCHAT_REDIS_PREFIX",
        "quartchat",
        _prefix,
        "Prefix of every Redis key and channel, so deployments can share one Redis",
    ),
    (
        "redis_pool_size",
        "QUARTCHAT_REDIS_POOL_SIZE",
        "32",
        _int(2, 10_000),
        "Redis connections per process for commands (callers wait for a free one)",
    ),
    (
        "redis_timeout_s",
        "QUARTCHAT_REDIS_TIMEOUT_S",
        "5",
        _float(0.1, 600),
        "Seconds a Redis command, a wait for a pooled connection or a publish may take",
    ),
    (
        "max_content",
        "QUARTCHAT_MAX_CONTENT",
        "4096",
        _int(1, 1_048_576),
        "Largest message content in UTF-8 bytes",
    ),
    (
        "max_rooms",
        "QUARTCHAT_MAX_ROOMS",
        "100",
        _int(1, 100_000),
        "Rooms one connection may have joined at once",
    ),
    (
        "rate_per_s",
        "QUARTCHAT_RATE_PER_S",
        "20",
        _float(0),
        "Frames per second per connection (token bucket refill; 0 = no limit)",
    ),
    (
        "rate_burst",
        "QUARTCHAT_RATE_BURST",
        "40",
        _int(1),
        "Token bucket size: frames a connection may send at once",
    ),
    (
        "outbound_queue",
        "QUARTCHAT_OUTBOUND_QUEUE",
        "1000",
        _int(10, 1_000_000),
        "Frames queued to one socket before it is closed with 4008 (slow consumer)",
    ),
    (
        "room_inbox",
        "QUARTCHAT_ROOM_INBOX",
        "10000",
        _int(10, 10_000_000),
        "Commands queued to one room actor before new posts get `unavailable`",
    ),
    (
        "history_max",
        "QUARTCHAT_HISTORY_MAX",
        "100",
        _int(1, 100),
        "Largest `history` page and `join.history` replay",
    ),
    (
        "room_idle_s",
        "QUARTCHAT_ROOM_IDLE_S",
        "30",
        _float(0),
        "Seconds a room actor with no local member lives before it is retired",
    ),
    (
        "batch_max",
        "QUARTCHAT_BATCH_MAX",
        "500",
        _int(1, 10_000),
        "Most messages written to the store in one transaction",
    ),
    (
        "db_timeout_s",
        "QUARTCHAT_DB_TIMEOUT_S",
        "5",
        _float(0.1, 600),
        "Seconds one database operation may take before it fails (a silent network partition)",
    ),
    (
        "gap_timeout_s",
        "QUARTCHAT_GAP_TIMEOUT_S",
        "0.2",
        _float(0),
        "Seconds a message ahead of the expected seq waits before the gap is read from the store",
    ),
    (
        "position_check_s",
        "QUARTCHAT_POSITION_CHECK_S",
        "2",
        _float(0.05, 3600),
        "Seconds between checks of every active room against the store's newest seq "
        "(heals a lost last message)",
    ),
    (
        "drain_timeout_s",
        "QUARTCHAT_DRAIN_TIMEOUT_S",
        "10",
        _float(0),
        "Seconds graceful shutdown waits for pending writes and socket flushes",
    ),
    (
        "allowed_origins",
        "QUARTCHAT_ALLOWED_ORIGINS",
        "*",
        _origins,
        "Origins allowed to open a WebSocket (* = any; requests without Origin are allowed)",
    ),
    (
        "fast_writes",
        "QUARTCHAT_FAST_WRITES",
        "true",
        _bool,
        "Write queued frames to hypercorn's WebSocket stream in one batch (false: one Quart send each)",
    ),
    (
        "event_loop",
        "QUARTCHAT_EVENT_LOOP",
        "auto",
        _event_loop,
        "Event loop of server processes: auto (uvloop when installed), uvloop or asyncio",
    ),
    (
        "auth",
        "QUARTCHAT_AUTH",
        "none",
        _auth,
        "Who may connect: none (sender_id is self-declared) or jwt (a signed token names the sender)",
    ),
    (
        "jwt_secret",
        "QUARTCHAT_JWT_SECRET",
        "",
        _secret(32),
        "jwt mode: HMAC secret (HS256), at least 32 bytes; or set QUARTCHAT_JWT_PUBLIC_KEY",
    ),
    (
        "jwt_public_key",
        "QUARTCHAT_JWT_PUBLIC_KEY",
        "",
        _optional,
        "jwt mode: path of a PEM public key (RS256, ES256 or EdDSA); or set QUARTCHAT_JWT_SECRET",
    ),
    (
        "jwt_algorithms",
        "QUARTCHAT_JWT_ALGORITHMS",
        "",
        _algorithms,
        "jwt mode: accepted `alg` values, comma-separated (default: HS256, or the key's algorithm)",
    ),
    (
        "jwt_audience",
        "QUARTCHAT_JWT_AUDIENCE",
        "",
        _optional,
        "jwt mode: required `aud` (unset: a token carrying `aud` is refused)",
    ),
    ("jwt_issuer", "QUARTCHAT_JWT_ISSUER", "", _optional, "jwt mode: required `iss`"),
    (
        "jwt_leeway_s",
        "QUARTCHAT_JWT_LEEWAY_S",
        "10",
        _float(0, 300),
        "jwt mode: clock skew allowed on exp, nbf and iat, in seconds",
    ),
    (
        "api_key",
        "QUARTCHAT_API_KEY",
        "",
        _secret(16),
        "Enables the server API (publish, disconnect, kick) for this bearer key, at least 16 bytes",
    ),
    ("log_level", "QUARTCHAT_LOG_LEVEL", "info", _log_level, "Log level"),
    ("log_json", "QUARTCHAT_LOG_JSON", "false", _bool, "Log one JSON object per line"),
]

# Settings whose empty value (`.env.example` shows them as `VAR=`) means the default.
_EMPTY_IS_DEFAULT = frozenset({"server_id", "jwt_algorithms"})

SETTINGS_DOC: list[tuple[str, str, str]] = [
    (var, default, doc) for _, var, default, _, doc in _SPEC
]


def load_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    file = Path(path)
    if not file.is_file():
        return values
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{file}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@attrs.frozen
class Settings:
    """Every quartchat setting, validated."""

    database_url: str = "sqlite+aiosqlite:///./quartchat.db"
    broker_url: str = "memory://"
    bind: str = "127.0.0.1:8080"
    server_id: str = attrs.field(factory=_default_server_id)
    workers: int = 1
    redis_prefix: str = "quartchat"
    redis_pool_size: int = 32
    redis_timeout_s: float = 5.0
    max_content: int = 4096
    max_rooms: int = 100
    rate_per_s: float = 20.0
    rate_burst: int = 40
    outbound_queue: int = 1000
    room_inbox: int = 10000
    history_max: int = 100
    room_idle_s: float = 30.0
    batch_max: int = 500
    db_timeout_s: float = 5.0
    gap_timeout_s: float = 0.2
    position_check_s: float = 2.0
    drain_timeout_s: float = 10.0
    allowed_origins: tuple[str, ...] = ("*",)
    fast_writes: bool = True
    event_loop: str = "auto"
    auth: str = "none"
    # Secrets never appear in repr (logs, tracebacks).
    jwt_secret: str | None = attrs.field(default=None, repr=False)
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) over a ``.env`` file."""
        merged: dict[str, str] = dict(load_env_file(env_file)) if env_file else {}
        merged.update(os.environ if environ is None else environ)
        kwargs: dict[str, Any] = {}
        for field, var, _default, parse, _doc in _SPEC:
            raw = merged.get(var)
            if raw is None or (field in _EMPTY_IS_DEFAULT and not raw.strip()):
                continue
            kwargs[field] = parse(var, raw)
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that cannot work, naming the variables."""
        if self.workers > 1 and self.broker_url == "memory://":
            raise ConfigError(
                f"QUARTCHAT_WORKERS={self.workers} with QUARTCHAT_BROKER_URL=memory://: the "
                "in-process broker cannot fan out across processes; use one worker or a "
                "redis:// broker"
            )
        if self.auth == "jwt":
            from .auth import TokenVerifier

            TokenVerifier.from_settings(self)  # reads the key; names what is wrong
        elif self.jwt_secret is not None or self.jwt_public_key is not None:
            raise ConfigError(
                "QUARTCHAT_JWT_SECRET / QUARTCHAT_JWT_PUBLIC_KEY are set but QUARTCHAT_AUTH="
                f"{self.auth}: set QUARTCHAT_AUTH=jwt, or remove the key"
            )

    @property
    def frame_limit(self) -> int:
        """Largest WebSocket frame accepted: room for max_content fully JSON-escaped."""
        return max(65536, self.max_content * 6 + 4096)
