"""Test doubles for the edges of the system (sockets), never for our own code."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from quartchat.connection import Connection


class FakeSocket:
    """Records what a Connection's writer sends; can be made to stall like a slow reader."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed_with: int | None = None
        self.stalled = stalled
        self._arrived = asyncio.Condition()

    async def send(self, data: str) -> None:
        if self.stalled:
            await asyncio.Event().wait()  # a reader that never reads
        async with self._arrived:
            self.frames.append(orjson.loads(data))
            self._arrived.notify_all()

    async def close(self, code: int, reason: str = "") -> None:
        async with self._arrived:
            self.closed_with = code
            self._arrived.notify_all()

    async def wait(self, predicate: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: predicate(self))

    async def next_of(
        self, type_: str, count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        await self.wait(lambda s: len(s.of(type_)) >= count, timeout)
        return self.of(type_)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == type_]


class Client:
    """A real Connection wired to a FakeSocket, with its writer task running."""

    def __init__(
        self, sender_id: str, conn_id: str, *, queue_size: int = 1000, stalled: bool = False
    ) -> None:
        self.conn = Connection(conn_id, sender_id, queue_size=queue_size)
        self.socket = FakeSocket(stalled=stalled)
        self.writer = asyncio.create_task(self.conn.run_writer(self.socket))

    async def aclose(self) -> None:
        self.writer.cancel()
        await asyncio.gather(self.writer, return_exceptions=True)
