"""How each kind of setting value is read from its text: parsed, checked, or refused.

Every parser takes the variable's name and its raw text and returns the value,
or raises :class:`ConfigError` naming the variable and the value (a secret's
value is never repeated). The checks themselves are :mod:`quartchat.validate`'s
(integers, names, store and broker URLs); this module turns their refusals
into configuration errors. The table of settings is :mod:`quartchat.config_table`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import ConfigError
from .logs import redact
from .validate import (
    INT_MAX,
    is_database_url,
    is_memory_url,
    is_redis_cluster_url,
    is_redis_url,
    parse_cluster_url,
    parse_int,
    valid_name,
)

__all__ = [
    "Parser",
    "algorithms",
    "auth_mode",
    "bind",
    "boolean",
    "broker_url",
    "database_url",
    "event_loop",
    "float_range",
    "gc_threshold",
    "identifier",
    "int_range",
    "log_level",
    "optional",
    "origins",
    "secret",
]

# A setting's parser: (variable name, raw text) -> value, or ConfigError.
Parser = Callable[[str, str], object]

_BIND_RE = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def int_range(lo: int, hi: int = INT_MAX) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            return parse_int(name, raw, lo, hi)
        except ValueError as exc:
            raise ConfigError(f"{name}={redact(raw)!r}: {exc}") from None

    return parse


def float_range(lo: float, hi: float | None = None) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={redact(raw)!r}: expected a number") from None
        if not (value >= lo) or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{name}={redact(raw)!r}: must be {bound}")
        return value

    return parse


def boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}={redact(raw)!r}: expected true or false")


def database_url(name: str, raw: str) -> str:
    url = raw.strip()
    if is_database_url(url):
        return url
    if url.startswith(("mysql://", "mysql+pymysql://", "sqlite://")):
        raise ConfigError(
            f"{name}={redact(raw)!r}: write the async driver explicitly, "
            "sqlite+aiosqlite:///path or mysql+aiomysql://user:pass@host/db"
        )
    raise ConfigError(
        f"{name}={redact(raw)!r}: unsupported database URL (use sqlite+aiosqlite:// or mysql+aiomysql://)"
    )


def broker_url(name: str, raw: str) -> str:
    url = raw.strip()
    if is_redis_cluster_url(url):
        try:
            parse_cluster_url(url)
        except ValueError as exc:  # names host:port parts only, never the credentials
            raise ConfigError(f"{name}: {exc}") from None
        return url
    if is_memory_url(url) or is_redis_url(url):
        return url
    raise ConfigError(
        f"{name}={redact(raw)!r}: unsupported broker URL "
        "(use memory://, redis://host:port/db or redis+cluster://host:port[,host:port...])"
    )


def bind(name: str, raw: str) -> str:
    value = raw.strip()
    match = _BIND_RE.fullmatch(value)
    try:
        if not match:
            raise ValueError("no HOST:PORT")
        parse_int("port", match.group(2), 0, 65535)
    except ValueError:
        raise ConfigError(
            f"{name}={redact(raw)!r}: expected HOST:PORT, e.g. 127.0.0.1:8080"
        ) from None
    return value


def identifier(name: str, raw: str) -> str:
    """A server id or key prefix: the room-id rule."""
    value = raw.strip()
    if not valid_name(value):
        raise ConfigError(f"{name}={redact(raw)!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    return value


def origins(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not items:
        raise ConfigError(f"{name}={redact(raw)!r}: give * or a comma-separated list of origins")
    return items


def log_level(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"{name}={redact(raw)!r}: one of debug, info, warning, error, critical")
    return value


def event_loop(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"auto", "uvloop", "asyncio"}:
        raise ConfigError(f"{name}={redact(raw)!r}: one of auto, uvloop, asyncio")
    if value == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ConfigError(f"{name}={redact(raw)!r}: uvloop is not installed") from None
    return value


def gc_threshold(name: str, raw: str) -> tuple[int, int, int] | None:
    """``default`` (None: Python's own, 700,10,10) or three positive integers G0,G1,G2."""
    value = raw.strip().lower()
    if value == "default":
        return None
    parts = [part.strip() for part in value.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError("give three comma-separated integers G0,G1,G2, or default")
        g0, g1, g2 = (parse_int(f"G{i}", part, 1, 10_000_000) for i, part in enumerate(parts))
    except ValueError as exc:
        raise ConfigError(f"{name}={redact(raw)!r}: {exc}") from None
    return (g0, g1, g2)


def auth_mode(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"none", "jwt"}:
        raise ConfigError(f"{name}={redact(raw)!r}: one of none, jwt")
    return value


def secret(min_bytes: int) -> Callable[[str, str], str | None]:
    # The value of a secret is never repeated in a message, not even a bad one.
    def parse(name: str, raw: str) -> str | None:
        value = raw.strip()
        if not value:
            return None
        if len(value.encode()) < min_bytes:
            raise ConfigError(f"{name}: too short, at least {min_bytes} bytes (value not shown)")
        return value

    return parse


def optional(name: str, raw: str) -> str | None:
    return raw.strip() or None


def algorithms(name: str, raw: str) -> tuple[str, ...]:
    from .auth import HMAC_ALGORITHMS, KEY_ALGORITHMS

    known = {a.lower(): a for a in (*HMAC_ALGORITHMS, *KEY_ALGORITHMS)}
    items = [item.strip() for item in raw.split(",") if item.strip()]
    chosen = []
    for item in items:
        if item.lower() == "none":
            raise ConfigError(f"{name}={redact(raw)!r}: `none` (unsigned tokens) is never accepted")
        if item.lower() not in known:
            raise ConfigError(
                f"{name}={redact(raw)!r}: unknown algorithm {item!r}; use one of "
                f"{', '.join(sorted(known.values()))}"
            )
        chosen.append(known[item.lower()])
    return tuple(chosen)
