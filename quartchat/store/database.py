"""The :class:`Store` over ``databases``: SQLite (aiosqlite) or MySQL/MariaDB (aiomysql).

Writes arrive as batches from room actors and go in as one multi-row INSERT
in one transaction (``execute_many`` is one statement per row: ~10x slower).
On SQLite every write is serialised through one lock, since SQLite has a
single writer and lock contention would otherwise surface as busy waits.

Connections are taken from the ``databases`` backend one per operation and
never through ``Database.fetch_*``/``Database.transaction()``: those bind a
connection to the calling asyncio task, and when a transaction fails on a dead
connection (its ROLLBACK fails too) or is cancelled by the op timeout,
``databases`` never releases it. The task then keeps a dead connection forever
(every later call in it fails with "Not connected"), the aiomysql pool loses the
slot for good (after ``maxsize`` such failures every acquire waits forever) and
``disconnect()`` waits forever for it. Here any operation that fails or is
cancelled closes its connection (the server rolls back an open transaction of a
closed session) and gives the slot back; a new connection is made on the next
acquire, so the store recovers by itself when the database comes back.

On SQLite, ``databases`` has no pool: every acquire opens a new SQLite
connection in a new aiosqlite thread (schema read, page cache, a thread stack
and, per thread, a glibc malloc arena). One per operation was three of them
per connect/join/post cycle under churn: most of the server's CPU, and
memory that glibc keeps after the threads are gone (16 arenas on 2 cores).
So SQLite connections are pooled here: at most ``_SQLITE_POOL`` at once
(an operation waits for one, within its op timeout). A connection goes back
to the pool only after an operation that succeeded and left no transaction
open; one whose operation failed or was cancelled is closed as above, so a
later operation gets a new connection, exactly as before. A pooled connection
unused for ``_SQLITE_IDLE_S`` is closed by a task of the store, which closes
them all when it is cancelled: an aiosqlite thread is not a daemon, and one
left idle would keep the process from exiting (a store never closed, say
after an uncaught error).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import warnings
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from databases import Database
from databases.interfaces import ConnectionBackend
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from . import DuplicateError, StoredMessage, StoreError
from .schema import clients, messages, rooms

__all__ = ["DatabaseStore", "OP_TIMEOUT", "CONNECT_TIMEOUT", "to_datetime", "to_ms"]

log = logging.getLogger(__name__)

# aiomysql turns the server's note on every INSERT IGNORE that finds its room
# row already there into a Python warning on stderr: expected, not a problem.
warnings.filterwarnings("ignore", message=r".*Duplicate entry", module=r"aiomysql\.cursors")

OP_TIMEOUT = 15.0  # seconds; a hung database must not hang an actor forever
CONNECT_TIMEOUT = 5.0  # seconds, for one new MySQL connection (TCP + handshake)
_OP_TIMEOUT = OP_TIMEOUT  # old name
_GROUP_ROWS = 2000  # most rows one grouped INSERT carries
_SQLITE_CLOSE_WAIT = 2.0  # seconds a failed operation waits for its SQLite connection to close
_SQLITE_POOL = 4  # SQLite connections (each one aiosqlite thread) open at most, kept for reuse
_SQLITE_IDLE_S = 2.0  # seconds a pooled SQLite connection may stay unused before it is closed


def _answer(waiter: asyncio.Future[None], exc: BaseException | None) -> None:
    if waiter.done():
        return  # the caller gave up (cancelled)
    if exc is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(exc)


_INSERT_COLUMNS = "room_id, seq, id, sender_id, content, client_msg_id, created_at"
_INSERT_MYSQL = f"INSERT INTO messages ({_INSERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
_INSERT_SQLITE = f"INSERT INTO messages ({_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"


def _mysql_params(r: StoredMessage) -> tuple[Any, ...]:
    return (r.room_id, r.seq, r.id, r.sender_id, r.content, r.client_msg_id,
            to_datetime(r.sent_at_ms))


def _sqlite_params(r: StoredMessage) -> tuple[Any, ...]:
    # The text form SQLAlchemy's SQLite DateTime writes and reads back.
    dt = to_datetime(r.sent_at_ms)
    return (r.room_id, r.seq, r.id, r.sender_id, r.content, r.client_msg_id,
            f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond:06d}")


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

    def __init__(
        self, url: str, *, op_timeout: float = OP_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT
    ) -> None:
        """``op_timeout`` bounds every call (acquire, queries, commit); a silent
        network partition makes calls fail after that long (a reset or refused
        connection makes them fail at once)."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.op_timeout = op_timeout
        if self.is_sqlite:
            self._db = Database(url, timeout=30)
        else:
            self._db = Database(
                url,
                charset="utf8mb4",
                connect_timeout=connect_timeout,
                minsize=1,
                maxsize=10,
                pool_recycle=3600,
            )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._groups: deque[tuple[list[StoredMessage], asyncio.Future[None]]] = deque()
        self._group_writer: asyncio.Task[None] | None = None
        self._known_rooms: set[str] = set()
        # SQLite connections being closed after a failure (the close may queue
        # behind a statement still running in aiosqlite's thread): awaited by close().
        self._closing: set[asyncio.Task[None]] = set()
        # SQLite only: connections kept for reuse (with when each was last used), the
        # slots bounding how many exist, and the task closing those left unused.
        self._idle: list[tuple[ConnectionBackend, float]] = []
        self._slots = asyncio.Semaphore(_SQLITE_POOL) if self.is_sqlite else None
        self._idle_closer: asyncio.Task[None] | None = None
        self._closed = False

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._db.connect()
        except Exception as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc
        if self.is_sqlite:
            # WAL lets readers run beside the writer; it persists in the file.
            async with self._session("connect") as conn:
                await conn.execute(sa.text("PRAGMA journal_mode=WAL"))

    async def close(self) -> None:
        if self._group_writer is not None and not self._group_writer.done():
            # Let queued writes finish (bounded), then stop the writer.
            try:
                async with asyncio.timeout(self.op_timeout):
                    await asyncio.shield(self._group_writer)
            except TimeoutError:
                self._group_writer.cancel()
            await asyncio.gather(self._group_writer, return_exceptions=True)
        self._closed = True
        if self._idle_closer is not None:
            self._idle_closer.cancel()  # it closes every pooled connection
            await asyncio.gather(self._idle_closer, return_exceptions=True)
        await self._close_idle(0.0)
        # Every operation gives its connection back within op_timeout, so the
        # pool's wait for used connections is bounded; the timeout is a safety net.
        try:
            async with asyncio.timeout(self.op_timeout + 5):
                if self._closing:
                    await asyncio.gather(*self._closing, return_exceptions=True)
                if self._db.is_connected:
                    await self._db.disconnect()
        except TimeoutError:
            log.warning("closing the database timed out; dropping its connections")
            pool = getattr(self._db._backend, "_pool", None)  # noqa: SLF001
            if pool is not None and hasattr(pool, "terminate"):
                pool.terminate()  # aiomysql: close the connections still in use

    @asynccontextmanager
    async def _op(self, what: str) -> AsyncIterator[None]:
        """Bound an operation in time and map driver errors to StoreError."""
        try:
            async with asyncio.timeout(self.op_timeout):
                yield
        except StoreError:
            raise
        except TimeoutError as exc:
            raise StoreError(f"{what}: timed out after {self.op_timeout:g} s") from exc
        except (OSError, RuntimeError, AssertionError) as exc:
            raise StoreError(f"{what}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "IntegrityError":
                raise DuplicateError(f"{what}: {exc}") from exc
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def _session(
        self, what: str, *, transaction: bool = False, write: bool = False
    ) -> AsyncIterator[ConnectionBackend]:
        """One bounded operation on a connection of its own, optionally in a transaction.

        On success the transaction is committed and the connection goes back to
        the pool. On any error or cancellation the connection is closed instead,
        never reused: its state is unknown (half-read result, open transaction,
        dead socket), and closing it makes the server roll back what it began.
        """
        async with self._op(what), AsyncExitStack() as stack:
            if write:
                await stack.enter_async_context(self._writing())
            conn = await self._acquire(stack)
            ok = False
            try:
                if transaction:
                    tx = conn.transaction()
                    await tx.start(is_root=True, extra_options={})
                yield conn
                if transaction:
                    await tx.commit()
                ok = True
            finally:
                if ok:
                    await self._give_back(conn)
                else:
                    await self._discard(conn)

    async def _acquire(self, stack: AsyncExitStack) -> ConnectionBackend:
        """A connection of our own: on SQLite a pooled one (waiting for a slot), else new."""
        if self._slots is not None:
            await self._slots.acquire()
            stack.callback(self._slots.release)
            if self._idle:
                return self._idle.pop()[0]  # the most recently used: the rest can expire
        # The backend's own connections, not Database's (see the module docstring).
        conn: ConnectionBackend = self._db._backend.connection()  # noqa: SLF001
        await conn.acquire()
        return conn

    async def _give_back(self, conn: ConnectionBackend) -> None:
        """After a successful operation: keep a clean SQLite connection, else release it."""
        if (self.is_sqlite and not self._closed and len(self._idle) < _SQLITE_POOL
                and not conn.raw_connection.in_transaction):
            self._idle.append((conn, asyncio.get_running_loop().time()))
            if self._idle_closer is None or self._idle_closer.done():
                # In an empty context: not pinning the caller's (a request's) objects.
                self._idle_closer = asyncio.create_task(
                    self._expire_idle(), name="sqlite-idle-closer", context=contextvars.Context()
                )
            return
        await conn.release()

    async def _expire_idle(self) -> None:
        """Close pooled connections unused for _SQLITE_IDLE_S; all of them when cancelled."""
        try:
            while self._idle:
                await asyncio.sleep(_SQLITE_IDLE_S)
                await self._close_idle(_SQLITE_IDLE_S)
        except asyncio.CancelledError:
            await self._close_idle(0.0)
            raise

    async def _close_idle(self, unused_for: float) -> None:
        cutoff = asyncio.get_running_loop().time() - unused_for
        stale = [conn for conn, used in self._idle if used <= cutoff]
        self._idle = [(conn, used) for conn, used in self._idle if used > cutoff]
        for conn in stale:
            await self._release_quietly(conn)

    async def _discard(self, conn: ConnectionBackend) -> None:
        """Close a connection whose state is unknown and give its pool slot back."""
        if self.is_sqlite:
            # Closing (which rolls back) queues behind any statement still running
            # in aiosqlite's thread, maybe a busy wait: wait for it a little (while
            # still holding the write lock), then let it finish on its own; close()
            # waits for it.
            task = asyncio.create_task(self._release_quietly(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            await asyncio.wait({task}, timeout=_SQLITE_CLOSE_WAIT)
            return
        # aiomysql: close the socket now; the pool then forgets the connection.
        raw = conn.raw_connection
        raw.close()
        await self._release_quietly(conn)

    @staticmethod
    async def _release_quietly(conn: ConnectionBackend) -> None:
        try:
            await conn.release()
        except Exception:  # already broken: nothing more to do for it
            log.debug("releasing a broken connection failed", exc_info=True)

    async def ping(self) -> None:
        async with self._session("ping") as conn:
            await conn.fetch_val(sa.text("SELECT 1"))

    async def max_seq(self, room_id: str) -> int:
        query = sa.select(sa.func.max(messages.c.seq)).where(messages.c.room_id == room_id)
        async with self._session("max_seq") as conn:
            value = await conn.fetch_val(query)
        return int(value or 0)

    def _insert_ignore(self, table: sa.Table) -> Any:
        if self.is_sqlite:
            return sqlite_dialect.insert(table).on_conflict_do_nothing()
        return mysql_dialect.insert(table).prefix_with("IGNORE")

    async def insert(self, rows: Sequence[StoredMessage]) -> None:
        """Store rows (one room, ascending seq) in one transaction, all or none.

        Concurrent calls (many rooms writing at once) are grouped: one writer
        task takes everything queued, writes it as one multi-row INSERT in one
        transaction (one commit, one fsync), and answers every caller. A group
        that fails on a unique key is retried caller by caller, so only the
        caller whose rows clash gets the DuplicateError.
        """
        if not rows:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._groups.append((list(rows), waiter))
        if self._group_writer is None or self._group_writer.done():
            self._group_writer = asyncio.create_task(self._write_groups(), name="store-writer")
        await waiter

    async def _write_groups(self) -> None:
        while self._groups:
            group: list[tuple[list[StoredMessage], asyncio.Future[None]]] = []
            size = 0
            while self._groups and (not group or size + len(self._groups[0][0]) <= _GROUP_ROWS):
                rows, waiter = self._groups.popleft()
                group.append((rows, waiter))
                size += len(rows)
            live = [(rows, waiter) for rows, waiter in group if not waiter.done()]
            try:
                await self._insert_now([r for rows, _ in live for r in rows])
            except DuplicateError as exc:
                if len(live) == 1:
                    _answer(live[0][1], exc)
                    continue
                for rows, waiter in live:
                    try:
                        await self._insert_now(rows)
                    except StoreError as one_exc:
                        _answer(waiter, one_exc)
                    else:
                        _answer(waiter, None)
            except StoreError as exc:
                for _, waiter in live:
                    _answer(waiter, exc)
            else:
                for _, waiter in live:
                    _answer(waiter, None)

    async def _insert_now(self, rows: Sequence[StoredMessage]) -> None:
        new_rooms = sorted({r.room_id for r in rows} - self._known_rooms)
        async with self._session("insert", transaction=True, write=True) as conn:
            if new_rooms:
                created = to_datetime(rows[0].sent_at_ms)
                await conn.execute(
                    self._insert_ignore(rooms).values(
                        [{"room_id": room_id, "created_at": created} for room_id in new_rooms]
                    )
                )
            # The hot path skips SQLAlchemy compilation (a multi-row Insert costs
            # ~0.1 ms a row to compile) and hands the driver one parameterised
            # statement: pymysql's executemany sends it as one multi-row INSERT,
            # sqlite3 runs it in-process inside the same transaction.
            raw = conn.raw_connection
            if self.is_sqlite:
                await raw.executemany(_INSERT_SQLITE, [_sqlite_params(r) for r in rows])
            else:
                async with raw.cursor() as cursor:
                    await cursor.executemany(_INSERT_MYSQL, [_mysql_params(r) for r in rows])
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
        async with self._session("find_client_ids") as conn:
            records = await conn.fetch_all(query)
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
        async with self._session("after") as conn:
            records = await conn.fetch_all(query)
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
        async with self._session("page") as conn:
            records = await conn.fetch_all(query)
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
        async with self._session("touch_clients", write=True) as conn:
            await conn.execute(query)
