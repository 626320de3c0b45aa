"""The SQLite dialect (aiosqlite, the embedded default): one writer at a time, reused
connections; see :mod:`.dialect` for what a dialect owns."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import datetime
from typing import Any

from .dialect import Dialect
from .driver import Connection, Driver
from .sqlite_pool import SqlitePool

__all__ = ["SqliteDialect"]

_SQLITE_CLOSE_WAIT = 2.0  # seconds a failed operation waits for its SQLite connection to close


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
