"""The in-process broker: the embedded default, for exactly one server process.

Presence is a counter per (room, sender); ``join``/``leave`` update it at once
and queue the announcement, which is delivered to the room's handlers on the
next loop iteration (or by ``settle()``), through the same channel path as
on Redis. A join and a leave whose announcements were not delivered yet
cancel out.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable

from ..events import PresenceEvent, PresenceKind, encode_events
from . import Handler

__all__ = ["MemoryBroker", "MemoryPresence"]


class MemoryPresence:
    """Presence held in this process (all there is when there is one process)."""

    def __init__(self, publish: Callable[[str, bytes], None]) -> None:
        self._publish = publish
        self._rooms: dict[str, dict[str, int]] = defaultdict(dict)
        # Announcements not delivered yet, in order: (room, sender) -> event.
        self._pending: dict[tuple[str, str], PresenceKind] = {}
        self._scheduled = False

    def join(self, room_id: str, sender_id: str) -> None:
        members = self._rooms[room_id]
        members[sender_id] = members.get(sender_id, 0) + 1
        if members[sender_id] == 1:
            self._queue(room_id, sender_id, "join")

    def leave(self, room_id: str, sender_id: str) -> None:
        members = self._rooms.get(room_id)
        if not members or members.get(sender_id, 0) <= 0:
            return
        members[sender_id] -= 1
        if members[sender_id] == 0:
            del members[sender_id]
            if not members:
                del self._rooms[room_id]
            self._queue(room_id, sender_id, "leave")

    def _queue(self, room_id: str, sender_id: str, event: PresenceKind) -> None:
        key = (room_id, sender_id)
        if key in self._pending and self._pending[key] != event:
            del self._pending[key]  # a join and a leave nobody heard yet cancel out
            return
        self._pending[key] = event
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for (room_id, sender_id), event in pending.items():
            self._publish(room_id, encode_events([PresenceEvent(sender_id, event)]))

    async def members(self, room_id: str) -> list[str]:
        return sorted(self._rooms.get(room_id, ()))

    async def rooms(self) -> list[tuple[str, int]]:
        return sorted((room, len(members)) for room, members in self._rooms.items())

    async def settle(self) -> None:
        self._flush()

    def clear(self) -> None:
        """Everyone leaves (the process is closing)."""
        for room_id, members in list(self._rooms.items()):
            for sender_id in list(members):
                members[sender_id] = 1
                self.leave(room_id, sender_id)
        self._flush()


class MemoryBroker:
    """Channels as a dictionary; publish calls handlers directly."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._presence = MemoryPresence(self._deliver)

    @property
    def presence(self) -> MemoryPresence:
        return self._presence

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._presence.clear()
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

    def publish(self, room_id: str, payload: bytes) -> Awaitable[None]:
        self._deliver(room_id, payload)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _deliver(self, room_id: str, payload: bytes) -> None:
        for handler in list(self._handlers.get(room_id, ())):
            handler(payload)
