"""The :class:`Store` over ``databases``: SQLite (aiosqlite) or MySQL/MariaDB (aiomysql).

Writes arrive as batches from room actors. Concurrent batches of many rooms
go in as one transaction: lock the rooms' counter rows (in key order, so two
servers' groups never deadlock), find retries by client_msg_id, give the new
posts the next seqs, insert them in one multi-row INSERT, move the counters,
commit (one fsync). A room's seqs are thus committed in seq order, with no
holes. On SQLite every write is serialised through one lock, since SQLite has
a single writer and lock contention would otherwise surface as busy waits,
and connections are reused (:mod:`.sqlite_pool`).

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
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any

from databases import Database
from databases.interfaces import ConnectionBackend

from ..validate import is_sqlite_url
from . import Appended, DuplicateError, NewMessage, StoredMessage, StoreError
from .append import Request, append_in, reply, row_of
from .counters import CounterReader
from .dialect import Dialect
from .sqlite_pool import SqlitePool

__all__ = ["CONNECT_TIMEOUT", "OP_TIMEOUT", "DatabaseStore"]

log = logging.getLogger(__name__)

# aiomysql turns the server's note on every INSERT IGNORE that finds its room
# row already there into a Python warning on stderr: expected, not a problem.
warnings.filterwarnings("ignore", message=r".*Duplicate entry", module=r"aiomysql\.cursors")

OP_TIMEOUT = 15.0  # seconds; a hung database must not hang an actor forever
CONNECT_TIMEOUT = 5.0  # seconds, for one new MySQL connection (TCP + handshake)
_GROUP_ROWS = 2000  # most rows one grouped transaction carries
_SQLITE_CLOSE_WAIT = 2.0  # seconds a failed operation waits for its SQLite connection to close
_KNOWN_ROOMS_MAX = 100_000  # rooms whose counter row this process knows exists (then forgets all)
_DEADLOCK_RETRIES = 3


def _is_deadlock(exc: BaseException) -> bool:
    # MySQL 1213 (deadlock) and 1205 (lock wait timeout): the transaction was
    # rolled back whole, so running it again is safe.
    text = str(exc)
    return "1213" in text or "1205" in text or "Deadlock" in text


class DatabaseStore:
    """Message history in SQL through ``databases``."""

    def __init__(
        self, url: str, *, op_timeout: float = OP_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT
    ) -> None:
        """``op_timeout`` bounds every call (acquire, queries, commit); a silent
        network partition makes calls fail after that long (a reset or refused
        connection makes them fail at once)."""
        self.url = url
        self.op_timeout = op_timeout
        self.dialect = Dialect(sqlite=is_sqlite_url(url))
        if self.dialect.sqlite:
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
        self._write_lock = asyncio.Lock() if self.dialect.sqlite else None
        self._sqlite_pool = SqlitePool(self._db._backend) if self.dialect.sqlite else None
        self._queue: deque[Request] = deque()
        self._group_writer: asyncio.Task[None] | None = None
        self._known_rooms: set[str] = set()
        self._counters = CounterReader(self.last_seqs)
        # SQLite connections being closed after a failure (the close may queue
        # behind a statement still running in aiosqlite's thread): awaited by close().
        self._closing: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._db.connect()
        except Exception as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc
        if self.dialect.sqlite:
            # WAL lets readers run beside the writer; it persists in the file.
            async with self._session("connect") as raw:
                await self.dialect.fetch(raw, "PRAGMA journal_mode=WAL", ())

    async def close(self) -> None:
        await self._counters.close()
        if self._group_writer is not None and not self._group_writer.done():
            # Let queued writes finish (bounded), then stop the writer.
            try:
                async with asyncio.timeout(self.op_timeout):
                    await asyncio.shield(self._group_writer)
            except TimeoutError:
                self._group_writer.cancel()
            await asyncio.gather(self._group_writer, return_exceptions=True)
        if self._sqlite_pool is not None:
            await self._sqlite_pool.close()
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
            pool = getattr(self._db._backend, "_pool", None)
            if pool is not None and hasattr(pool, "terminate"):
                pool.terminate()  # aiomysql: close the connections still in use

    # ---- sessions -------------------------------------------------------

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
    ) -> AsyncIterator[Any]:
        """One bounded operation on a driver connection of its own, optionally in a transaction.

        On success the transaction is committed and the connection goes back to
        the pool. On any error or cancellation the connection is closed instead,
        never reused: its state is unknown (half-read result, open transaction,
        dead socket), and closing it makes the server roll back what it began.
        """
        async with self._op(what), AsyncExitStack() as stack:
            if write:
                await stack.enter_async_context(self._writing())
            if self._sqlite_pool is not None:
                conn = await self._sqlite_pool.acquire(stack)
            else:
                conn = self._db._backend.connection()  # see the module docstring
                await conn.acquire()
            ok = False
            raw = conn.raw_connection
            try:
                if transaction:
                    await self._begin(raw)
                yield raw
                if transaction:
                    await self._commit(raw)
                ok = True
            finally:
                if ok and self._sqlite_pool is not None:
                    await self._sqlite_pool.give_back(conn)
                elif ok:
                    await conn.release()
                else:
                    await self._discard(conn)

    async def _begin(self, raw: Any) -> None:
        if self.dialect.sqlite:
            # IMMEDIATE takes the write lock now, waiting on the busy timeout. A
            # deferred transaction that reads, then writes, fails at once with
            # "database is locked" when another connection wrote in between.
            await raw.execute("BEGIN IMMEDIATE")
        else:
            await raw.begin()

    @staticmethod
    async def _commit(raw: Any) -> None:
        await raw.commit()

    async def _discard(self, conn: ConnectionBackend) -> None:
        """Close a connection whose state is unknown and give its pool slot back."""
        if self.dialect.sqlite:
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

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        if self._write_lock is None:
            yield
        else:
            async with self._write_lock:
                yield

    # ---- reads ----------------------------------------------------------

    async def ping(self) -> None:
        async with self._session("ping") as raw:
            await self.dialect.fetch(raw, "SELECT 1", ())

    async def max_seq(self, room_id: str) -> int:
        """The room's counter; concurrent calls share one query (:mod:`.counters`)."""
        return await self._counters.read(room_id)

    async def last_seqs(self, room_ids: Sequence[str]) -> dict[str, int]:
        if not room_ids:
            return {}
        ids = list(dict.fromkeys(room_ids))
        async with self._session("last_seqs") as raw:
            records = await self.dialect.fetch(raw, self.dialect.select_counters(len(ids)), ids)
        return {room: int(last) for room, last in records}

    async def after(
        self, room_id: str, after_seq: int, upto_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        params: list[Any] = [room_id, after_seq]
        if upto_seq is not None:
            params.append(upto_seq)
        params.append(limit)
        async with self._session("after") as raw:
            records = await self.dialect.fetch(
                raw, self.dialect.select_after(upto_seq is not None), params
            )
        return [row_of(r) for r in records]

    async def page(
        self, room_id: str, before_seq: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        params: list[Any] = [room_id]
        if before_seq is not None:
            params.append(before_seq)
        params.append(limit + 1)  # one extra row tells whether older messages exist
        async with self._session("page") as raw:
            records = await self.dialect.fetch(
                raw, self.dialect.select_page(before_seq is not None), params
            )
        rows = [row_of(r) for r in records]
        has_more = len(rows) > limit
        rows = rows[:limit]
        rows.reverse()
        return rows, has_more

    # ---- writes ---------------------------------------------------------

    async def append(self, room_id: str, posts: Sequence[NewMessage]) -> list[Appended]:
        """Store posts with the room's next seqs (see the module docstring).

        Concurrent calls (many rooms writing at once) are grouped: one writer
        task takes everything queued and writes it in one transaction (one
        commit, one fsync), then answers every caller. A group that fails on a
        unique key is retried caller by caller, so only the caller at fault
        gets the error.
        """
        if not posts:
            return []
        waiter: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._queue.append(Request(room_id, list(posts), waiter))
        if self._group_writer is None or self._group_writer.done():
            self._group_writer = asyncio.create_task(self._write_groups(), name="store-writer")
        return await waiter

    async def _write_groups(self) -> None:
        while self._queue:
            group: list[Request] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0].posts) <= _GROUP_ROWS):
                request = self._queue.popleft()
                if not request.waiter.done():  # the caller may have given up (cancelled)
                    group.append(request)
                    size += len(request.posts)
            if not group:
                continue
            try:
                answers = await self._append_now(group)
            except DuplicateError:
                if len(group) == 1:
                    reply(group[0], exc=DuplicateError("unexpected duplicate key"))
                    continue
                for request in group:
                    try:
                        (one,) = await self._append_now([request])
                    except StoreError as exc:
                        reply(request, exc=exc)
                    else:
                        reply(request, one)
            except StoreError as exc:
                for request in group:
                    reply(request, exc=exc)
            else:
                for request, answer in zip(group, answers):
                    reply(request, answer)

    async def _append_now(self, group: Sequence[Request]) -> list[list[Appended]]:
        rooms = sorted({r.room_id for r in group})
        new_rooms = [room for room in rooms if room not in self._known_rooms]
        if new_rooms:
            await self._create_rooms(new_rooms, group[0].posts[0].sent_at_ms)
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with self._session("insert", transaction=True, write=True) as raw:
                    answers, missing = await append_in(self.dialect, raw, rooms, group)
                if missing:
                    # Its counter row is gone (a database restored without it): forget
                    # that we knew it, so the next attempt creates it again.
                    self._known_rooms.difference_update(missing)
                    raise StoreError(f"insert: no counter row for rooms {missing}")
                return answers
            except DuplicateError:
                raise
            except StoreError as exc:
                if not _is_deadlock(exc) or attempt == _DEADLOCK_RETRIES - 1:
                    raise
                log.info("insert deadlocked (attempt %d); running it again", attempt + 1)
        raise AssertionError("unreachable")

    async def _create_rooms(self, rooms: Sequence[str], sent_at_ms: int) -> None:
        """Counter rows for rooms this process has not written yet, outside the insert's
        transaction: an INSERT IGNORE there would take a shared lock that the counter's
        FOR UPDATE then upgrades, and two servers doing that deadlock."""
        created = self.dialect.timestamp(sent_at_ms)
        async with self._session("create_rooms", write=True) as raw:
            await self.dialect.execute_many(
                raw, self.dialect.insert_rooms, [(room, created) for room in rooms]
            )
        if len(self._known_rooms) + len(rooms) > _KNOWN_ROOMS_MAX:
            self._known_rooms.clear()
        self._known_rooms.update(rooms)

    async def touch_clients(self, seen: dict[str, datetime]) -> None:
        if not seen:
            return
        d = self.dialect
        rows = [
            (sender, d.datetime_param(when), d.datetime_param(when))
            for sender, when in sorted(seen.items())
        ]
        async with self._session("touch_clients", write=True) as raw:
            await d.execute_many(raw, d.upsert_clients, rows)
