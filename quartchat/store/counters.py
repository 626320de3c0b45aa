"""Rooms' counters read together: concurrent ``max_seq`` calls (a thousand rooms
starting at once, or all catching up after a broker reconnect) are answered
by one ``last_seqs`` query per ``batch`` rooms instead of one query each."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence

from . import StoreError

__all__ = ["CounterReader"]


class CounterReader:
    """Coalesces counter reads into batched queries; one reader task at a time."""

    def __init__(
        self, read_many: Callable[[Sequence[str]], Awaitable[dict[str, int]]], *, batch: int = 500
    ) -> None:
        self._read_many = read_many
        self._batch = batch
        self._waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def read(self, room_id: str) -> int:
        """The room's counter (0 for a room never used)."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(room_id, []).append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="store-counters")
        return await waiter

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while self._waiters:
            rooms = list(itertools.islice(self._waiters, self._batch))
            waiters = {room: self._waiters.pop(room) for room in rooms}
            try:
                found = await self._read_many(rooms)
            except StoreError as exc:
                for futures in waiters.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for room, futures in waiters.items():
                for future in futures:
                    if not future.done():
                        future.set_result(found.get(room, 0))
