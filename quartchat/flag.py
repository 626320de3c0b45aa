"""Flag: an ``asyncio.Event`` that allocates nothing until somebody waits.

Every socket has a few events (the writer's wake-up, room for replays, closed)
and most are never waited on: ``asyncio.Event`` builds a waiter deque (about
760 bytes) up front for each, which at 10,000 sockets is tens of megabytes of
empty deques. A Flag keeps its waiters' futures in a list made on the first
wait, and behaves like an Event otherwise (set, clear, is_set, wait).
"""

from __future__ import annotations

import asyncio

__all__ = ["Flag"]


class Flag:
    """A settable flag that tasks can wait on (``asyncio.Event`` semantics)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set the flag and wake every task waiting on it."""
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        """Return at once if set, else once :meth:`set` is called."""
        if self._set:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if self._waiters is not None and fut in self._waiters:
                self._waiters.remove(fut)
