"""The in-process broker: the embedded default, for exactly one server process."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

from . import Handler, SeqFloor

__all__ = ["MemoryBroker", "MemoryPresence"]


class MemoryPresence:
    """Presence held in this process (all there is when there is one process)."""

    def __init__(self) -> None:
        self._rooms: dict[str, Counter[str]] = defaultdict(Counter)

    async def add(self, room_id: str, sender_id: str) -> bool:
        members = self._rooms[room_id]
        members[sender_id] += 1
        return members[sender_id] == 1

    async def remove(self, room_id: str, sender_id: str) -> bool:
        members = self._rooms.get(room_id)
        if members is None or members[sender_id] <= 0:
            return False
        members[sender_id] -= 1
        if members[sender_id] == 0:
            del members[sender_id]
            if not members:
                del self._rooms[room_id]
            return True
        return False

    async def members(self, room_id: str) -> list[str]:
        return sorted(self._rooms.get(room_id, ()))

    async def rooms(self) -> list[tuple[str, int]]:
        return sorted((room, len(members)) for room, members in self._rooms.items())


class MemoryBroker:
    """Channels and sequences as dictionaries; publish calls handlers directly."""

    def __init__(self) -> None:
        self.presence = MemoryPresence()
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._seqs: dict[str, int] = {}
        self._seed_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._handlers.clear()

    async def ping(self) -> None:
        return None

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        self._handlers[room_id].append(handler)

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        handlers = self._handlers.get(room_id)
        if handlers and handler in handlers:
            handlers.remove(handler)
            if not handlers:
                del self._handlers[room_id]

    async def publish(self, room_id: str, payload: bytes) -> None:
        for handler in list(self._handlers.get(room_id, ())):
            handler(payload)

    async def next_seqs(self, room_id: str, count: int, floor: SeqFloor) -> int:
        if room_id not in self._seqs:
            async with self._seed_locks[room_id]:
                if room_id not in self._seqs:
                    self._seqs[room_id] = await floor()
            self._seed_locks.pop(room_id, None)
        self._seqs[room_id] += count
        return self._seqs[room_id]

    async def reseed(self, room_id: str, floor: SeqFloor) -> None:
        stored = await floor()
        self._seqs[room_id] = max(self._seqs.get(room_id, 0), stored)
