"""Everything that differs between SQLite and MySQL/MariaDB: one class per backend.

:func:`dialect_for` picks :class:`SqliteDialect` or :class:`MysqlDialect` once,
by URL; :mod:`.database` and :mod:`.append` then have no backend branch. A
dialect owns:

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
import logging
import sqlite3
import warnings
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from datetime import UTC, datetime
from typing import Any, ClassVar

from ..validate import is_sqlite_url
from . import multi
from .driver import Connection, Driver
from .sqlite_pool import SqlitePool

__all__ = [
    "Dialect",
    "MysqlDialect",
    "Query",
    "SqliteDialect",
    "dialect_for",
    "to_datetime",
    "to_ms",
]

log = logging.getLogger(__name__)

_MESSAGE_COLUMNS = "room_id, seq, id, sender_id, content, client_msg_id, created_at"
_SQLITE_CLOSE_WAIT = 2.0  # seconds a failed operation waits for its SQLite connection to close
_MYSQL_RETRYABLE = frozenset({1213, 1205})  # deadlock, lock wait timeout

Query = tuple[str, Sequence[Any]]
"""One statement and its parameters."""

# aiomysql turns the server's note on every INSERT IGNORE that finds its room
# row already there into a Python warning on stderr: expected, not a problem.
warnings.filterwarnings("ignore", message=r".*Duplicate entry", module=r"aiomysql\.cursors")


def to_datetime(ms: int) -> datetime:
    """Epoch milliseconds as a naive UTC datetime (how the columns store it)."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def to_ms(value: datetime | str) -> int:
    """A stored datetime (naive UTC, or SQLite's text form) back to epoch milliseconds."""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return round(stamp.timestamp() * 1000)


def dialect_for(url: str, *, connect_timeout: float) -> Dialect:
    """The dialect of a database URL (``connect_timeout``: one new MySQL connection)."""
    if is_sqlite_url(url):
        return SqliteDialect(url)
    return MysqlDialect(url, connect_timeout=connect_timeout)


class Dialect(abc.ABC):
    """Statements, driver calls and connection handling of one backend (see the module)."""

    mark: ClassVar[str]  # one parameter placeholder
    insert_ignore: ClassVar[str]
    row_lock: ClassVar[str]  # appended to the counters' read in an append transaction
    upsert_last_seen: ClassVar[str]  # how a clients row that exists moves last_seen
    after_connect: ClassVar[tuple[str, ...]] = ()  # statements run once on connect

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

    def find_retries(self, groups: Sequence[tuple[str, str, int]]) -> str:
        """Stored rows for (room, sender, k client_msg_ids) groups, each an index range scan."""
        p = self.mark
        terms = [
            f"(room_id = {p} AND sender_id = {p} AND client_msg_id IN ({self.marks(k)}))"
            for _, _, k in groups
        ]
        return f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE " + " OR ".join(terms)

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


class SqliteDialect(Dialect):
    """SQLite through aiosqlite: one writer at a time, reused connections (:mod:`.sqlite_pool`)."""

    mark = "?"
    insert_ignore = "INSERT OR IGNORE"
    # SQLite has one writer at a time and writes are serialised (:meth:`writing`),
    # so the plain read is already exclusive.
    row_lock = ""
    upsert_last_seen = "ON CONFLICT (sender_id) DO UPDATE SET last_seen = excluded.last_seen"
    # WAL lets readers run beside the writer; it persists in the file.
    after_connect = ("PRAGMA journal_mode=WAL",)

    def __init__(self, url: str) -> None:
        super().__init__(Driver(url, timeout=30))
        # Every write goes through one lock: SQLite has a single writer, and
        # lock contention would otherwise surface as busy waits.
        self._write_lock = asyncio.Lock()
        self._pool = SqlitePool(self.driver)
        # Connections being closed after a failure (the close may queue behind a
        # statement still running in aiosqlite's thread): awaited by close().
        self._closing: set[asyncio.Task[None]] = set()

    def datetime_param(self, dt: datetime) -> Any:
        return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond:06d}"  # SQLAlchemy's text form

    async def fetch(self, raw: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with raw.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def execute_many(self, raw: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await raw.executemany(sql, [tuple(r) for r in rows])

    async def begin(self, raw: Any) -> None:
        # IMMEDIATE takes the write lock now, waiting on the busy timeout. A
        # deferred transaction that reads, then writes, fails at once with
        # "database is locked" when another connection wrote in between.
        await raw.execute("BEGIN IMMEDIATE")

    async def acquire(self, stack: AsyncExitStack) -> Connection:
        return await self._pool.acquire(stack)

    async def give_back(self, conn: Connection) -> None:
        await self._pool.give_back(conn)

    async def discard(self, conn: Connection) -> None:
        # Closing (which rolls back) queues behind any statement still running
        # in aiosqlite's thread, maybe a busy wait: wait for it a little (while
        # still holding the write lock), then let it finish on its own; close()
        # waits for it.
        task = asyncio.create_task(self.driver.release(conn, quietly=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        await asyncio.wait({task}, timeout=_SQLITE_CLOSE_WAIT)

    def writing(self) -> AbstractAsyncContextManager[Any]:
        return self._write_lock

    async def close(self, timeout: float) -> None:
        await self._pool.close()
        await super().close(timeout)

    async def _settle(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def is_duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)


class MysqlDialect(Dialect):
    """MySQL/MariaDB through aiomysql's pool: row locks, writes run side by side.

    An append is two round trips of multi-statement queries (:mod:`.multi`):
    ``BEGIN``, the counters' ``FOR UPDATE``, the retry lookup; then the
    multi-row ``INSERT``, one counter ``UPDATE`` per room, ``COMMIT``.

    The connections allow multi-statement queries (``CLIENT.MULTI_STATEMENTS``,
    which aiomysql 0.3.2 sets anyway), so an SQL injection could run any
    statement it likes: every value in every statement must be a parameter,
    escaped by pymysql (``cursor.mogrify``), never text built into the SQL
    (only placeholder counts are formatted in).
    """

    mark = "%s"
    insert_ignore = "INSERT IGNORE"
    # Row-locks the counters in key order, so two servers' groups never deadlock.
    row_lock = " FOR UPDATE"
    upsert_last_seen = "ON DUPLICATE KEY UPDATE last_seen = VALUES(last_seen)"

    def __init__(self, url: str, *, connect_timeout: float) -> None:
        super().__init__(
            Driver(
                url,
                charset="utf8mb4",
                connect_timeout=connect_timeout,
                minsize=1,
                maxsize=10,
                pool_recycle=3600,
                client_flag=multi.MULTI_STATEMENTS,  # for the append's batches
            )
        )

    def datetime_param(self, dt: datetime) -> Any:
        return dt

    async def fetch(self, raw: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with raw.cursor() as cursor:
            await cursor.execute(sql, tuple(params))
            return list(await cursor.fetchall())

    async def execute_many(self, raw: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        # pymysql sends one multi-row INSERT.
        async with raw.cursor() as cursor:
            await cursor.executemany(sql, [tuple(r) for r in rows])

    async def begin(self, raw: Any) -> None:
        await raw.begin()

    async def begin_append(
        self, raw: Any, rooms: Sequence[str], retries: Query | None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        # One round trip. The server runs a batch's statements one after the
        # other, so the retry lookup (a statement of its own after the FOR
        # UPDATE) starts only once the counters' locks are granted: no other
        # writer can store a copy of a retry in between. The lookup also runs
        # when a room has no counter row; it only reads.
        statements: list[Query] = [("BEGIN", ()), (self.lock_counters(len(rooms)), rooms)]
        if retries is not None:
            statements.append(retries)
        async with raw.cursor() as cursor:
            results = await multi.run(cursor, [cursor.mogrify(q, tuple(p)) for q, p in statements])
        return results[1], (results[2] if retries is not None else [])

    async def commit_append(
        self, raw: Any, inserts: Sequence[Sequence[Any]], counters: Sequence[tuple[int, str]]
    ) -> None:
        # One round trip (more only past multi.QUERY_BYTES): the multi-row INSERT,
        # one UPDATE per room, COMMIT. Its caller acks only after the COMMIT's own
        # result was read without error.
        async with raw.cursor() as cursor:
            texts = multi.insert_rows(cursor, self.insert_messages, inserts) if inserts else []
            texts += [cursor.mogrify(self.update_counter, tuple(c)) for c in counters]
            texts.append("COMMIT")
            await multi.run(cursor, texts)

    async def acquire(self, stack: AsyncExitStack) -> Connection:
        return await self.driver.acquire()

    async def give_back(self, conn: Connection) -> None:
        await self.driver.release(conn)

    async def discard(self, conn: Connection) -> None:
        # Close the socket now; the pool then forgets the connection.
        self.driver.raw(conn).close()
        await self.driver.release(conn, quietly=True)

    # pymysql's errors (aiomysql raises them) are told by name and module:
    # pymysql has no type stubs to import them with.

    def is_duplicate(self, exc: BaseException) -> bool:
        return _is_pymysql(exc) and type(exc).__name__ == "IntegrityError"

    def retryable(self, exc: BaseException) -> bool:
        # 1213 (deadlock) and 1205 (lock wait timeout): the server rolled back
        # the whole transaction.
        cause = exc.__cause__
        return (
            cause is not None
            and _is_pymysql(cause)
            and bool(cause.args)
            and cause.args[0] in _MYSQL_RETRYABLE
        )


def _is_pymysql(exc: BaseException) -> bool:
    return type(exc).__module__.partition(".")[0] == "pymysql"
