"""The :class:`Store` over ``databases``: SQLite (aiosqlite) or MySQL/MariaDB (aiomysql).

Writes arrive as batches from room actors. Concurrent batches of many rooms
go in as one transaction: lock the rooms' counter rows (in key order, so two
servers' groups never deadlock), find retries by client_msg_id, give the new
posts the next seqs, insert them in one multi-row INSERT, move the counters,
commit (one fsync). A room's seqs are thus committed in seq order, with no
holes. Whatever differs between SQLite and MySQL (the SQL, whether writes are
serialised behind a lock, how connections are taken and given back, which
errors are duplicates or retryable deadlocks) is the :mod:`.dialect`'s, chosen
once by URL; this module has no backend branch.

Every operation takes a driver connection of its own (:mod:`.driver`), never
one of ``databases``' per-task connections: when a transaction fails on a dead
connection (its ROLLBACK fails too) or is cancelled by the op timeout,
``databases`` never releases those. The task then keeps a dead connection forever
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
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any

from . import Appended, DuplicateError, NewMessage, StoredMessage, StoreError
from .append import Request, append_in, reply, row_of
from .counters import CounterReader
from .dialect import Dialect, dialect_for

__all__ = ["CONNECT_TIMEOUT", "OP_TIMEOUT", "DatabaseStore"]

log = logging.getLogger(__name__)

OP_TIMEOUT = 15.0  # seconds; a hung database must not hang an actor forever
CONNECT_TIMEOUT = 5.0  # seconds, for one new MySQL connection (TCP + handshake)
_GROUP_ROWS = 2000  # most rows one grouped transaction carries
_KNOWN_ROOMS_MAX = 100_000  # rooms whose counter row this process knows exists (then forgets all)
_DEADLOCK_RETRIES = 3


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
        self.dialect: Dialect = dialect_for(url, connect_timeout=connect_timeout)
        self._queue: deque[Request] = deque()
        self._group_writers: set[asyncio.Task[None]] = set()
        self._known_rooms: set[str] = set()
        self._counters = CounterReader(self.last_seqs)

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.op_timeout):
                await self.dialect.connect()
        except Exception as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc
        for sql in self.dialect.after_connect:
            async with self._session("connect") as raw:
                await self.dialect.fetch(raw, sql, ())

    async def close(self) -> None:
        await self._counters.close()
        writers = [t for t in self._group_writers if not t.done()]
        if writers:
            # Let queued writes finish (bounded), then stop the writers.
            try:
                async with asyncio.timeout(self.op_timeout):
                    await asyncio.shield(asyncio.gather(*writers, return_exceptions=True))
            except TimeoutError:
                for task in writers:
                    task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
        await self.dialect.close(self.op_timeout + 5)

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
            if self.dialect.is_duplicate(exc):
                raise DuplicateError(f"{what}: {exc}") from exc
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def _session(
        self, what: str, *, transaction: bool = False, write: bool = False
    ) -> AsyncIterator[Any]:
        """One bounded operation on a driver connection of its own, optionally in a transaction
        (the append begins and commits its own: :func:`.append.append_in`).

        On success the transaction is committed and the connection goes back to
        the pool. On any error or cancellation the connection is closed instead,
        never reused: its state is unknown (half-read result, open transaction,
        dead socket), and closing it makes the server roll back what it began.
        """
        d = self.dialect
        async with self._op(what), AsyncExitStack() as stack:
            if write:
                await stack.enter_async_context(d.writing())
            conn = await d.acquire(stack)
            ok = False
            raw = d.driver.raw(conn)
            try:
                if transaction:
                    await d.begin(raw)
                yield raw
                if transaction:
                    await d.commit(raw)
                ok = True
            finally:
                if ok:
                    await d.give_back(conn)
                else:
                    await d.discard(conn)

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

        Concurrent calls (many rooms writing at once) are grouped: a writer
        task takes everything queued and writes it in one transaction (one
        commit, one fsync), then answers every caller. Up to the dialect's
        ``concurrent_appends`` writers run at once (MySQL: 2; SQLite: 1, it has
        one writer anyway). A group that fails on a
        unique key is retried caller by caller, so only the caller at fault
        gets the error.
        """
        if not posts:
            return []
        waiter: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._queue.append(Request(room_id, list(posts), waiter))
        # done(), not the set's size: a writer that found the queue empty has ended,
        # and its done callback (which forgets it) may not have run yet.
        running = sum(not task.done() for task in self._group_writers)
        if running < self.dialect.concurrent_appends:
            # A writer of its own while the others are mid-transaction (MySQL): the
            # post does not wait for their commit. Groups never share a room (each
            # room writes one batch at a time), and rooms are locked in key order.
            task = asyncio.create_task(self._write_groups(), name="store-writer")
            self._group_writers.add(task)
            task.add_done_callback(self._group_writers.discard)
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
                async with self._session("insert", write=True) as raw:
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
                if not self.dialect.retryable(exc) or attempt == _DEADLOCK_RETRIES - 1:
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
