"""The message store seam: a :class:`Store` protocol and a factory that picks by URL.

``sqlite+aiosqlite://`` (embedded default) and ``mysql+aiomysql://`` are both
served by :class:`quartchat.store.database.DatabaseStore` over ``databases``;
what differs between the two is its dialect (:mod:`~quartchat.store.dialect`:
one class per backend, in :mod:`~quartchat.store.sqlite` and
:mod:`~quartchat.store.mysql`, picked by URL), and all that reaches into
``databases``' internals is :mod:`~quartchat.store.driver`.

The store is the one arbiter of seqs: :meth:`Store.append` assigns them in the
same transaction that stores the rows (a per-room counter row), so a room's
seqs are committed in order and without holes. Whoever sees seq ``n`` knows
that every seq below it is already readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import attrs

from ..validate import is_database_url

__all__ = [
    "Appended",
    "DuplicateError",
    "NewMessage",
    "Store",
    "StoreError",
    "StoredMessage",
    "create_store",
]


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


@attrs.frozen
class NewMessage:
    """A post to store; the store gives it its seq."""

    id: str
    sender_id: str
    content: str
    client_msg_id: str | None
    sent_at_ms: int


@attrs.frozen
class Appended:
    """What :meth:`Store.append` did with one post: stored now, or found as an earlier copy."""

    row: StoredMessage
    created: bool


class StoreError(Exception):
    """The store could not be read or written (down, timed out, refused)."""


class DuplicateError(StoreError):
    """A write hit a unique key it should never hit (a bug or a foreign writer)."""


class Store(Protocol):
    """Durable, ordered message history."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""

    async def append(self, room_id: str, posts: Sequence[NewMessage]) -> list[Appended]:
        """Store posts in order, all or none, each with the room's next seq.

        A post whose (sender_id, client_msg_id) is already stored in the room
        (or earlier in ``posts``) is not stored again: its answer is the
        original row with ``created=False``. One answer per post, in order.
        """

    async def max_seq(self, room_id: str) -> int:
        """The room's highest assigned (and so committed) seq, 0 for a room never used."""

    async def last_seqs(self, room_ids: Sequence[str]) -> dict[str, int]:
        """:meth:`max_seq` of many rooms in one query (rooms never used are left out)."""

    async def after(
        self, room_id: str, after_seq: int, upto_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        """Messages with ``after_seq < seq <= upto_seq``, oldest first, at most ``limit``."""

    async def page(
        self, room_id: str, before_seq: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        """The newest ``limit`` messages below ``before_seq``, oldest first, and has_more."""

    async def touch_clients(self, seen: dict[str, datetime]) -> None:
        """Record sender ids as seen at the given times (first_seen kept, last_seen moved)."""


def create_store(url: str, *, op_timeout: float = 5.0) -> Store:
    """The store for ``url``, by scheme; every operation is bounded by ``op_timeout`` s."""
    if is_database_url(url):
        from .database import DatabaseStore

        return DatabaseStore(url, op_timeout=op_timeout)
    raise ValueError(f"unsupported database URL {url!r}")
