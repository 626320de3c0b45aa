"""Reused SQLite connections (``databases`` has none on SQLite).

On SQLite, ``databases`` opens a new connection in a new aiosqlite thread on
every acquire (schema read, page cache, a thread stack and, per thread, a
glibc malloc arena). One per operation was three of them per connect / join
/ post cycle under churn: most of the server's CPU, and memory glibc keeps
after the threads are gone (16 arenas on 2 cores). So at most ``size``
connections exist at once (an operation waits for one, within its op
timeout). A connection comes back here only after an operation that
succeeded and left no transaction open; one whose operation failed or was
cancelled is closed by the store, never reused, so the next operation gets
a new one. A connection unused for ``idle_s`` is closed by a task of the
pool, which closes them all when cancelled: an aiosqlite thread is not a
daemon, and one left open would keep the process from exiting.
"""

from __future__ import annotations

import asyncio
import contextvars
from contextlib import AsyncExitStack

from .driver import Connection, Driver

__all__ = ["SqlitePool"]


class SqlitePool:
    """At most ``size`` SQLite connections, the idle ones kept for ``idle_s``."""

    def __init__(self, driver: Driver, *, size: int = 4, idle_s: float = 2.0) -> None:
        self._driver = driver
        self._size = size
        self._idle_s = idle_s
        self._idle: list[tuple[Connection, float]] = []
        self._slots = asyncio.Semaphore(size)
        self._closer: asyncio.Task[None] | None = None
        self._closed = False

    async def acquire(self, stack: AsyncExitStack) -> Connection:
        """A connection for one operation; its slot is given back when ``stack`` closes."""
        await self._slots.acquire()
        stack.callback(self._slots.release)
        if self._idle:
            return self._idle.pop()[0]  # the most recently used: the rest can expire
        return await self._driver.acquire()

    async def give_back(self, conn: Connection) -> None:
        """After a successful operation: keep a clean connection, else release it."""
        in_transaction = self._driver.raw(conn).in_transaction
        if self._closed or len(self._idle) >= self._size or in_transaction:
            await self._driver.release(conn, quietly=True)
            return
        self._idle.append((conn, asyncio.get_running_loop().time()))
        if self._closer is None or self._closer.done():
            # In an empty context: not pinning the caller's (a request's) objects.
            self._closer = asyncio.create_task(
                self._expire(), name="sqlite-idle-closer", context=contextvars.Context()
            )

    async def close(self) -> None:
        self._closed = True
        if self._closer is not None:
            self._closer.cancel()  # it closes every pooled connection
            await asyncio.gather(self._closer, return_exceptions=True)
        await self._close_idle(0.0)

    async def _expire(self) -> None:
        try:
            while self._idle:
                await asyncio.sleep(self._idle_s)
                await self._close_idle(self._idle_s)
        except asyncio.CancelledError:
            await self._close_idle(0.0)
            raise

    async def _close_idle(self, unused_for: float) -> None:
        cutoff = asyncio.get_running_loop().time() - unused_for
        stale = [conn for conn, used in self._idle if used <= cutoff]
        self._idle = [(conn, used) for conn, used in self._idle if used > cutoff]
        for conn in stale:
            await self._driver.release(conn, quietly=True)
