"""The message store seam: a :class:`Store` protocol and a factory that picks by URL.

``sqlite+aiosqlite://`` (embedded default) and ``mysql+aiomysql://`` are both
served by :class:`quartchat.store.database.DatabaseStore` over ``databases``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import attrs

__all__ = ["StoredMessage", "Store", "StoreError", "DuplicateError", "create_store"]


@attrs.frozen
class StoredMessage:
    """One message row."""

    room_id: str
    seq: int
    id: str
    sender_id: str
    content: str
    client_msg_id: str | None
    sent_at_ms: int


class StoreError(Exception):
    """The store could not be read or written (down, timed out, refused)."""


class DuplicateError(StoreError):
    """An insert hit a unique key: a reused seq or a retried client_msg_id."""


class Store(Protocol):
    """Durable, ordered message history."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""

    async def max_seq(self, room_id: str) -> int:
        """The room's highest stored seq, 0 for a room never used."""

    async def insert(self, rows: Sequence[StoredMessage]) -> None:
        """Store rows (one room, ascending seq) in one transaction, all or none."""

    async def find_client_ids(
        self, room_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], StoredMessage]:
        """Stored messages of ``room_id`` by (sender_id, client_msg_id)."""

    async def after(self, room_id: str, after_seq: int, upto_seq: int | None, limit: int) -> list[StoredMessage]:
        """Messages with ``after_seq < seq <= upto_seq``, oldest first, at most ``limit``."""

    async def page(self, room_id: str, before_seq: int | None, limit: int) -> tuple[list[StoredMessage], bool]:
        """The newest ``limit`` messages below ``before_seq``, oldest first, and has_more."""

    async def touch_clients(self, seen: dict[str, datetime]) -> None:
        """Record sender ids as seen at the given times (first_seen kept, last_seen moved)."""


def create_store(url: str, *, op_timeout: float = 5.0) -> Store:
    """The store for ``url``, by scheme; every operation is bounded by ``op_timeout`` s."""
    if url.startswith(("sqlite+aiosqlite://", "mysql+aiomysql://")):
        from .database import DatabaseStore

        return DatabaseStore(url, op_timeout=op_timeout)
    raise ValueError(f"unsupported database URL {url!r}")
