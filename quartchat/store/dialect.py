"""Everything that differs between SQLite and MySQL/MariaDB: one class per backend.

This module has their base, :class:`Dialect` (the SQL text and the defaults),
and :func:`dialect_for`, which picks :class:`.sqlite.SqliteDialect` or
:class:`.mysql.MysqlDialect` once, by URL; :mod:`.database` and
:mod:`.append` then have no backend branch. A dialect owns:

- the SQL text: placeholders, ``INSERT OR IGNORE`` / ``INSERT IGNORE``, the
  counters' row lock (``FOR UPDATE`` on MySQL only), the clients upsert, and
  how a timestamp parameter is passed;
- how the driver runs a statement: the store's hot path talks to the driver
  directly (``aiosqlite`` or ``aiomysql`` connections, reached through
  :mod:`.driver`), since compiling SQLAlchemy statements costs about 0.1 ms a
  row, more than the insert itself;
- the connections: the ``databases`` options, how an operation's connection
  is acquired, given back after success or discarded after a failure, how a
  transaction begins, what runs once after connecting, and how everything is
  closed;
- how the append transaction reaches the server (:meth:`Dialect.begin_append`,
  :meth:`Dialect.commit_append`): statement by statement on SQLite, two
  multi-statement round trips on MySQL;
- whether writes are serialised behind one lock (SQLite: one writer at a time);
- which driver errors mean a duplicate key and which a retryable deadlock.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from datetime import UTC, datetime
from typing import Any, ClassVar

from ..validate import is_sqlite_url
from .driver import Connection, Driver

__all__ = ["Dialect", "Query", "dialect_for", "to_datetime", "to_ms"]

log = logging.getLogger(__name__)

_MESSAGE_COLUMNS = "room_id, seq, id, sender_id, content, client_msg_id, created_at"

Query = tuple[str, Sequence[Any]]
"""One statement and its parameters."""


@functools.lru_cache(maxsize=256)
def to_datetime(ms: int) -> datetime:
    """Epoch milliseconds as a naive UTC datetime (how the columns store it).

    Cached (a datetime is immutable): every row of a batch has the same stamp."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def to_ms(value: datetime | str) -> int:
    """A stored datetime (naive UTC, or SQLite's text form) back to epoch milliseconds."""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return round(stamp.timestamp() * 1000)


def dialect_for(url: str, *, connect_timeout: float) -> Dialect:
    """The dialect of a database URL (``connect_timeout``: one new MySQL connection)."""
    # Imported here: each backend's module builds on this one's base class.
    if is_sqlite_url(url):
        from .sqlite import SqliteDialect

        return SqliteDialect(url)
    from .mysql import MysqlDialect

    return MysqlDialect(url, connect_timeout=connect_timeout)


class Dialect(abc.ABC):
    """Statements, driver calls and connection handling of one backend (see the module)."""

    mark: ClassVar[str]  # one parameter placeholder
    insert_ignore: ClassVar[str]
    row_lock: ClassVar[str]  # appended to the counters' read in an append transaction
    upsert_last_seen: ClassVar[str]  # how a clients row that exists moves last_seen
    after_connect: ClassVar[tuple[str, ...]] = ()  # statements run once on connect
    concurrent_appends: ClassVar[int] = 1  # append transactions in flight at once

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        p = self.mark
        self.insert_messages = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({self.marks(7)})"
        self.insert_rooms = (
            f"{self.insert_ignore} INTO rooms (room_id, created_at, last_seq) VALUES ({p}, {p}, 0)"
        )
        self.update_counter = f"UPDATE rooms SET last_seq = {p} WHERE room_id = {p}"
        self.upsert_clients = (
            f"INSERT INTO clients (sender_id, first_seen, last_seen) VALUES ({self.marks(3)}) "
            f"{self.upsert_last_seen}"
        )

    # ---- SQL ------------------------------------------------------------

    def marks(self, n: int) -> str:
        """``n`` comma-separated placeholders."""
        return ", ".join([self.mark] * n)

    def lock_counters(self, n: int) -> str:
        """Read (and on MySQL row-lock, in key order) the counters of ``n`` rooms."""
        return (
            f"SELECT room_id, last_seq FROM rooms WHERE room_id IN ({self.marks(n)}) "
            f"ORDER BY room_id{self.row_lock}"
        )

    def select_counters(self, n: int) -> str:
        return f"SELECT room_id, last_seq FROM rooms WHERE room_id IN ({self.marks(n)})"

    def find_retries(self, groups: Sequence[tuple[str, str, int]], *, probe: bool = False) -> str:
        """Stored rows for (room, sender, k client_msg_ids) groups, each an index range scan;
        with ``probe`` only their seqs: the drivers parse every column's description of a
        result, also when it has no row (most lookups find none)."""
        p = self.mark
        terms = [
            f"(room_id = {p} AND sender_id = {p} AND client_msg_id IN ({self.marks(k)}))"
            for _, _, k in groups
        ]
        columns = "seq" if probe else _MESSAGE_COLUMNS
        return f"SELECT {columns} FROM messages WHERE " + " OR ".join(terms)

    def select_after(self, bounded: bool) -> str:
        p = self.mark
        upto = f" AND seq <= {p}" if bounded else ""
        return (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE room_id = {p} AND seq > {p}"
            f"{upto} ORDER BY seq LIMIT {p}"
        )

    def select_page(self, bounded: bool) -> str:
        p = self.mark
        before = f" AND seq < {p}" if bounded else ""
        return (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE room_id = {p}{before} "
            f"ORDER BY seq DESC LIMIT {p}"
        )

    def timestamp(self, ms: int) -> Any:
        """A timestamp parameter (epoch ms) as the driver takes it."""
        return self.datetime_param(to_datetime(ms))

    @abc.abstractmethod
    def datetime_param(self, dt: datetime) -> Any:
        """A naive UTC datetime parameter as the driver takes it."""

    # ---- driver calls ---------------------------------------------------

    @abc.abstractmethod
    async def fetch(self, raw: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """All rows of one query on a driver connection."""

    @abc.abstractmethod
    async def execute_many(self, raw: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many parameter rows."""

    @abc.abstractmethod
    async def begin(self, raw: Any) -> None:
        """Start a transaction."""

    @staticmethod
    async def commit(raw: Any) -> None:
        await raw.commit()

    # ---- the append transaction (:func:`.append.append_in`) ---------------

    async def begin_append(
        self, raw: Any, rooms: Sequence[str], retries: Query | None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Begin the append transaction, lock the counters of ``rooms`` (key order), then
        read the stored copies of retries (``retries``, the lookup), in that order.

        Returns the counter rows (one per room that has one) and the retry rows.
        Statement by statement; the retries are not looked up when a room has no
        counter row (nothing is written then)."""
        await self.begin(raw)
        counters = await self.fetch(raw, self.lock_counters(len(rooms)), rooms)
        if retries is None or len(counters) < len(rooms):
            return counters, []
        return counters, await self.fetch(raw, *retries)

    async def commit_append(
        self, raw: Any, inserts: Sequence[Sequence[Any]], counters: Sequence[tuple[int, str]]
    ) -> None:
        """Insert the new message rows, move the counters (``(last_seq, room_id)``), commit."""
        if inserts:
            await self.execute_many(raw, self.insert_messages, inserts)
            await self.execute_many(raw, self.update_counter, counters)
        await self.commit(raw)

    # ---- connections ----------------------------------------------------

    async def connect(self) -> None:
        await self.driver.connect()

    @abc.abstractmethod
    async def acquire(self, stack: AsyncExitStack) -> Connection:
        """A connection for one operation (``stack`` closes when the operation ends)."""

    @abc.abstractmethod
    async def give_back(self, conn: Connection) -> None:
        """After an operation that succeeded: the connection may be reused."""

    @abc.abstractmethod
    async def discard(self, conn: Connection) -> None:
        """After an operation that failed or was cancelled: close the connection, free its slot.

        Its state is unknown (half-read result, open transaction, dead socket);
        closing it makes the server roll back what it began."""

    def writing(self) -> AbstractAsyncContextManager[Any]:
        """Held around every write: a lock where writes are serialised, else nothing."""
        return nullcontext()

    async def close(self, timeout: float) -> None:
        """Close every connection; past ``timeout`` s drop those still in use."""
        # Every operation gives its connection back within its op timeout, so the
        # pool's wait for used connections is bounded; the timeout is a safety net.
        try:
            async with asyncio.timeout(timeout):
                await self._settle()
                await self.driver.disconnect()
        except TimeoutError:
            log.warning("closing the database timed out; dropping its connections")
            self.driver.terminate()

    async def _settle(self) -> None:
        """Wait for what must end before the pool closes."""

    # ---- errors ---------------------------------------------------------

    @abc.abstractmethod
    def is_duplicate(self, exc: BaseException) -> bool:
        """The driver error is a unique key violation."""

    def retryable(self, exc: BaseException) -> bool:
        """The failed transaction was rolled back whole by the server, so running it
        again is safe (``exc``: the :class:`StoreError`, caused by the driver's error)."""
        return False
