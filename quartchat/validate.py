"""One validator per kind of value: ids, bounded integers, store and broker URLs.

The URL schemes are owned here: the config checks a URL with these functions
and the store and broker factories choose by them, so both agree on what a URL
means. A ``redis+cluster://`` URL is also parsed here (:func:`parse_cluster_url`),
once for the config's check and again by whoever connects (the broker, the
migration lock), so a URL the config accepted is one they can use.

Every check here is a full match: ``re.fullmatch`` (``$`` would accept a
trailing newline, so ``"room\\n"`` would pass as a room id). Integers are
bounded to what every store accepts (a signed 64-bit column, and SQLite's
driver raises ``OverflowError`` past it). The callers turn a refusal into
their own error (``ChatError`` for clients, ``ConfigError`` for settings).
It imports nothing of quartchat, so every module (client included) may use it.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple
from urllib.parse import unquote

__all__ = [
    "DATABASE_SCHEMES",
    "ID_PATTERN",
    "INT_MAX",
    "MEMORY_URL",
    "MYSQL_SCHEME",
    "REDIS_CLUSTER_SCHEME",
    "REDIS_SCHEMES",
    "ROOM_ID_RE",
    "SENDER_ID_PATTERN",
    "SENDER_ID_RE",
    "SQLITE_SCHEME",
    "ClusterURL",
    "InvalidValue",
    "check_int",
    "is_database_url",
    "is_memory_url",
    "is_redis_cluster_url",
    "is_redis_url",
    "is_sqlite_url",
    "parse_cluster_url",
    "parse_int",
    "valid_client_msg_id",
    "valid_name",
    "valid_room_id",
    "valid_sender_id",
]

# The largest integer every store keeps (BIGINT / SQLite INTEGER): 2**63 - 1.
INT_MAX: Final = 2**63 - 1

ID_PATTERN: Final = "[A-Za-z0-9_.:-]{1,64}"  # room ids, server ids, key prefixes
SENDER_ID_PATTERN: Final = "[A-Za-z0-9_.@:-]{1,64}"
ROOM_ID_RE: Final = re.compile(ID_PATTERN)
SENDER_ID_RE: Final = re.compile(SENDER_ID_PATTERN)
# An integer as text: an optional minus and ASCII digits only (int() would also
# take spaces, underscores, "+" and non-ASCII digits). 20 digits is past INT_MAX.
_INT_TEXT: Final = re.compile(r"-?[0-9]{1,20}")

SQLITE_SCHEME: Final = "sqlite+aiosqlite://"
MYSQL_SCHEME: Final = "mysql+aiomysql://"
DATABASE_SCHEMES: Final = (SQLITE_SCHEME, MYSQL_SCHEME)
MEMORY_URL: Final = "memory://"  # the in-process broker
REDIS_CLUSTER_SCHEME: Final = "redis+cluster://"  # startup nodes: host:port[,host:port...]
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", REDIS_CLUSTER_SCHEME)


class InvalidValue(ValueError):
    """A value a validator refused (wrong type or out of range); the message says why."""


def valid_room_id(value: object) -> bool:
    """True for a string that is entirely a room id (``[A-Za-z0-9_.:-]{1,64}``)."""
    return isinstance(value, str) and ROOM_ID_RE.fullmatch(value) is not None


def valid_name(value: object) -> bool:
    """Same rule as a room id: server ids and Redis key prefixes."""
    return valid_room_id(value)


def valid_sender_id(value: object) -> bool:
    """True for a string that is entirely a sender id (``[A-Za-z0-9_.@:-]{1,64}``)."""
    return isinstance(value, str) and SENDER_ID_RE.fullmatch(value) is not None


def valid_client_msg_id(value: object) -> bool:
    """True for a ``client_msg_id``: a string of 1..64 characters."""
    return isinstance(value, str) and 1 <= len(value) <= 64


def check_int(name: str, value: object, lo: int = 0, hi: int = INT_MAX) -> int:
    """``value`` if it is an int (not a bool) in ``lo..hi``; else :class:`InvalidValue`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidValue(f"{name} must be an integer")
    if value < lo or value > min(hi, INT_MAX):
        raise InvalidValue(f"{name} must be {lo}..{min(hi, INT_MAX)}")
    return value


def parse_int(name: str, raw: str, lo: int = 0, hi: int = INT_MAX) -> int:
    """An integer written as text (a query parameter, a setting), checked like :func:`check_int`."""
    text = raw.strip()
    if _INT_TEXT.fullmatch(text) is None:
        raise InvalidValue(f"{name} must be an integer")
    return check_int(name, int(text), lo, hi)


def is_database_url(url: str) -> bool:
    """True for a URL of a store we have (the async drivers, written explicitly)."""
    return url.startswith(DATABASE_SCHEMES)


def is_sqlite_url(url: str) -> bool:
    """True for an (embedded) SQLite store URL."""
    return url.startswith(SQLITE_SCHEME)


def is_memory_url(url: str) -> bool:
    """True for the in-process broker, which fans out within one process only."""
    return url == MEMORY_URL


def is_redis_url(url: str) -> bool:
    """True for a Redis broker URL (a single Redis, or a Redis Cluster)."""
    return url.startswith(REDIS_SCHEMES)


def is_redis_cluster_url(url: str) -> bool:
    """True for a Redis Cluster broker URL (``redis+cluster://host:port[,host:port...]``)."""
    return url.startswith(REDIS_CLUSTER_SCHEME)


class ClusterURL(NamedTuple):
    """A parsed ``redis+cluster://`` URL: the startup nodes and the credentials."""

    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterURL:
    """Startup nodes and credentials of ``redis+cluster://[user:password@]host:port[,host:port...]``.

    ValueError if malformed; its message names the host:port parts only, never
    the credentials."""
    if not is_redis_cluster_url(url):
        raise ValueError(f"not a {REDIS_CLUSTER_SCHEME} URL")
    rest = url[len(REDIS_CLUSTER_SCHEME) :].split("?", 1)[0].rstrip("/")
    username = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, _, secret = auth.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    nodes: list[tuple[str, int]] = []
    for part in rest.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{REDIS_CLUSTER_SCHEME} needs host:port[,host:port...], got {part.strip()!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return ClusterURL(nodes, username, password)
