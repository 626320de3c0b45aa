"""The SQL that differs between SQLite and MySQL/MariaDB, in one object.

The store's hot path talks to the driver directly (``aiosqlite`` or
``aiomysql`` connections under ``databases``): compiling SQLAlchemy
statements costs about 0.1 ms a row, more than the insert itself. Everything
dialect-specific (placeholders, row locks, insert-or-ignore, upserts, how a
timestamp is passed) lives here so the store itself has no dialect branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["Dialect", "to_datetime", "to_ms"]

_MESSAGE_COLUMNS = "room_id, seq, id, sender_id, content, client_msg_id, created_at"


def to_datetime(ms: int) -> datetime:
    """Epoch milliseconds as a naive UTC datetime (how the columns store it)."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def to_ms(value: datetime | str) -> int:
    """A stored datetime (naive UTC, or SQLite's text form) back to epoch milliseconds."""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return round(stamp.timestamp() * 1000)


class Dialect:
    """Statements and driver calls for one backend."""

    def __init__(self, *, sqlite: bool) -> None:
        self.sqlite = sqlite
        p = "?" if sqlite else "%s"
        self._p = p
        self.insert_messages = (
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({', '.join([p] * 7)})"
        )
        self.insert_rooms = (
            f"INSERT {'OR IGNORE' if sqlite else 'IGNORE'} INTO rooms "
            f"(room_id, created_at, last_seq) VALUES ({p}, {p}, 0)"
        )
        self.update_counter = f"UPDATE rooms SET last_seq = {p} WHERE room_id = {p}"
        if sqlite:
            self.upsert_clients = (
                "INSERT INTO clients (sender_id, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT (sender_id) DO UPDATE SET last_seen = excluded.last_seen"
            )
        else:
            self.upsert_clients = (
                "INSERT INTO clients (sender_id, first_seen, last_seen) VALUES (%s, %s, %s) "
                "ON DUPLICATE KEY UPDATE last_seen = VALUES(last_seen)"
            )

    def marks(self, n: int) -> str:
        """``n`` comma-separated placeholders."""
        return ", ".join([self._p] * n)

    def lock_counters(self, n: int) -> str:
        """Read (and on MySQL row-lock, in key order) the counters of ``n`` rooms.

        SQLite has one writer at a time, and the store serialises its writes,
        so the plain read is already exclusive there.
        """
        lock = "" if self.sqlite else " FOR UPDATE"
        return (
            f"SELECT room_id, last_seq FROM rooms WHERE room_id IN ({self.marks(n)}) "
            f"ORDER BY room_id{lock}"
        )

    def select_counters(self, n: int) -> str:
        return f"SELECT room_id, last_seq FROM rooms WHERE room_id IN ({self.marks(n)})"

    def find_retries(self, groups: Sequence[tuple[str, str, int]]) -> str:
        """Stored rows for (room, sender, k client_msg_ids) groups, each an index range scan."""
        p = self._p
        terms = [
            f"(room_id = {p} AND sender_id = {p} AND client_msg_id IN ({self.marks(k)}))"
            for _, _, k in groups
        ]
        return f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE " + " OR ".join(terms)

    def select_after(self, bounded: bool) -> str:
        p = self._p
        upto = f" AND seq <= {p}" if bounded else ""
        return (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE room_id = {p} AND seq > {p}"
            f"{upto} ORDER BY seq LIMIT {p}"
        )

    def select_page(self, bounded: bool) -> str:
        p = self._p
        before = f" AND seq < {p}" if bounded else ""
        return (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE room_id = {p}{before} "
            f"ORDER BY seq DESC LIMIT {p}"
        )

    def timestamp(self, ms: int) -> Any:
        """A timestamp parameter as the driver takes it (SQLite: SQLAlchemy's text form)."""
        dt = to_datetime(ms)
        if self.sqlite:
            return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond:06d}"
        return dt

    def datetime_param(self, dt: datetime) -> Any:
        if self.sqlite:
            return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond:06d}"
        return dt

    async def fetch(self, raw: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self.sqlite:
            async with raw.execute(sql, tuple(params)) as cursor:
                return list(await cursor.fetchall())
        async with raw.cursor() as cursor:
            await cursor.execute(sql, tuple(params))
            return list(await cursor.fetchall())

    async def execute_many(self, raw: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many parameter rows (pymysql sends one multi-row INSERT)."""
        if self.sqlite:
            await raw.executemany(sql, [tuple(r) for r in rows])
            return
        async with raw.cursor() as cursor:
            await cursor.executemany(sql, [tuple(r) for r in rows])
