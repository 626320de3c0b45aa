"""The :class:`Store` over ``databases``: SQLite (aiosqlite) or MySQL/MariaDB (aiomysql).

Writes arrive as batches from room actors and go in as one multi-row INSERT
in one transaction (``execute_many`` is one statement per row: ~10x slower).
On SQLite every write is serialised through one lock, since SQLite has a
single writer and lock contention would otherwise surface as busy waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from databases import Database
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from . import DuplicateError, StoredMessage, StoreError
from .schema import clients, messages, rooms

__all__ = ["DatabaseStore", "to_datetime", "to_ms"]

log = logging.getLogger(__name__)

_OP_TIMEOUT = 15.0  # seconds; a hung database must not hang an actor forever


def to_datetime(ms: int) -> datetime:
    """Epoch milliseconds as a naive UTC datetime (how the columns store it)."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def to_ms(value: Any) -> int:
    """A stored datetime (naive UTC) back to epoch milliseconds."""
    if isinstance(value, str):  # defensive: SQLite without type processing
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(round(value.timestamp() * 1000))


def _row(record: Any) -> StoredMessage:
    return StoredMessage(
        room_id=record["room_id"],
        seq=int(record["seq"]),
        id=record["id"],
        sender_id=record["sender_id"],
        content=record["content"],
        client_msg_id=record["client_msg_id"],
        sent_at_ms=to_ms(record["created_at"]),
    )


_COLUMNS = (
    messages.c.room_id,
    messages.c.seq,
    messages.c.id,
    messages.c.sender_id,
    messages.c.content,
    messages.c.client_msg_id,
    messages.c.created_at,
)


class DatabaseStore:
    """Message history in SQL through ``databases``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._db = Database(url, timeout=30)
        else:
            self._db = Database(
                url,
                charset="utf8mb4",
                connect_timeout=5,
                minsize=1,
                maxsize=10,
                pool_recycle=3600,
            )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._known_rooms: set[str] = set()

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(_OP_TIMEOUT):
                await self._db.connect()
                if self.is_sqlite:
                    # WAL lets readers run beside the writer; it persists in the file.
                    await self._db.execute("PRAGMA journal_mode=WAL")
        except Exception as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc

    async def close(self) -> None:
        if self._db.is_connected:
            await self._db.disconnect()

    @asynccontextmanager
    async def _op(self, what: str) -> AsyncIterator[None]:
        """Bound an operation in time and map driver errors to StoreError."""
        try:
            async with asyncio.timeout(_OP_TIMEOUT):
                yield
        except StoreError:
            raise
        except TimeoutError as exc:
            raise StoreError(f"{what}: timed out") from exc
        except (OSError, RuntimeError, AssertionError) as exc:
            raise StoreError(f"{what}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "IntegrityError":
                raise DuplicateError(f"{what}: {exc}") from exc
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._op("ping"):
            await self._db.fetch_val("SELECT 1")

    async def max_seq(self, room_id: str) -> int:
        query = sa.select(sa.func.max(messages.c.seq)).where(messages.c.room_id == room_id)
        async with self._op("max_seq"):
            value = await self._db.fetch_val(query)
        return int(value or 0)

    def _insert_ignore(self, table: sa.Table) -> Any:
        if self.is_sqlite:
            return sqlite_dialect.insert(table).on_conflict_do_nothing()
        return mysql_dialect.insert(table).prefix_with("IGNORE")

    async def insert(self, rows: Sequence[StoredMessage]) -> None:
        if not rows:
            return
        values = [
            {
                "room_id": r.room_id,
                "seq": r.seq,
                "id": r.id,
                "sender_id": r.sender_id,
                "content": r.content,
                "client_msg_id": r.client_msg_id,
                "created_at": to_datetime(r.sent_at_ms),
            }
            for r in rows
        ]
        new_rooms = {r.room_id for r in rows} - self._known_rooms
        async with self._op("insert"), self._writing():
            async with self._db.transaction():
                for room_id in sorted(new_rooms):
                    await self._db.execute(
                        self._insert_ignore(rooms).values(
                            room_id=room_id, created_at=to_datetime(rows[0].sent_at_ms)
                        )
                    )
                await self._db.execute(messages.insert().values(values))
        self._known_rooms.update(new_rooms)

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        if self._write_lock is None:
            yield
        else:
            async with self._write_lock:
                yield

    async def find_client_ids(
        self, room_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], StoredMessage]:
        if not keys:
            return {}
        query = sa.select(*_COLUMNS).where(
            messages.c.room_id == room_id,
            sa.tuple_(messages.c.sender_id, messages.c.client_msg_id).in_(list(keys)),
        )
        async with self._op("find_client_ids"):
            records = await self._db.fetch_all(query)
        found = {}
        for record in records:
            row = _row(record)
            assert row.client_msg_id is not None
            found[(row.sender_id, row.client_msg_id)] = row
        return found

    async def after(
        self, room_id: str, after_seq: int, upto_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        conditions = [messages.c.room_id == room_id, messages.c.seq > after_seq]
        if upto_seq is not None:
            conditions.append(messages.c.seq <= upto_seq)
        query = sa.select(*_COLUMNS).where(*conditions).order_by(messages.c.seq).limit(limit)
        async with self._op("after"):
            records = await self._db.fetch_all(query)
        return [_row(r) for r in records]

    async def page(
        self, room_id: str, before_seq: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        conditions = [messages.c.room_id == room_id]
        if before_seq is not None:
            conditions.append(messages.c.seq < before_seq)
        # One extra row tells whether older messages exist.
        query = (
            sa.select(*_COLUMNS).where(*conditions).order_by(messages.c.seq.desc()).limit(limit + 1)
        )
        async with self._op("page"):
            records = await self._db.fetch_all(query)
        rows = [_row(r) for r in records]
        has_more = len(rows) > limit
        rows = rows[:limit]
        rows.reverse()
        return rows, has_more

    async def touch_clients(self, seen: dict[str, datetime]) -> None:
        if not seen:
            return
        values = [
            {"sender_id": sender, "first_seen": when, "last_seen": when}
            for sender, when in sorted(seen.items())
        ]
        if self.is_sqlite:
            ins = sqlite_dialect.insert(clients).values(values)
            query = ins.on_conflict_do_update(
                index_elements=[clients.c.sender_id], set_={"last_seen": ins.excluded.last_seen}
            )
        else:
            mins = mysql_dialect.insert(clients).values(values)
            query = mins.on_duplicate_key_update(last_seen=mins.inserted.last_seen)
        async with self._op("touch_clients"), self._writing():
            await self._db.execute(query)
