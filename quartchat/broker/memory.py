"""The in-process broker: the embedded default, for exactly one server process."""

from __future__ import annotations

from collections import Counter, defaultdict

from ..events import PresenceEvent, encode_events
from ..protocol import encode
from . import Handler

__all__ = ["MemoryBroker", "MemoryPresence"]


class MemoryPresence:
    """Presence held in this process (all there is when there is one process).

    Changes apply at once and are announced on the room's channel like the
    Redis broker's: a ``presence`` payload for the first in and the last out.
    """

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._rooms: dict[str, Counter[str]] = defaultdict(Counter)

    def join(self, room_id: str, sender_id: str) -> None:
        members = self._rooms[room_id]
        members[sender_id] += 1
        if members[sender_id] == 1:
            self._broker.announce(room_id, sender_id, "join")

    def leave(self, room_id: str, sender_id: str) -> None:
        members = self._rooms.get(room_id)
        if members is None or members[sender_id] <= 0:
            return
        members[sender_id] -= 1
        if members[sender_id] == 0:
            del members[sender_id]
            if not members:
                del self._rooms[room_id]
            self._broker.announce(room_id, sender_id, "leave")

    async def members(self, room_id: str) -> list[str]:
        return sorted(self._rooms.get(room_id, ()))

    async def rooms(self) -> list[tuple[str, int]]:
        return sorted((room, len(members)) for room, members in self._rooms.items())

    async def settle(self) -> None:
        return None


class MemoryBroker:
    """Channels as a dictionary; publish calls handlers directly."""

    def __init__(self) -> None:
        self._presence = MemoryPresence(self)
        self._handlers: dict[str, list[Handler]] = defaultdict(list)

    @property
    def presence(self) -> MemoryPresence:
        return self._presence

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
        self._deliver(room_id, payload)

    def _deliver(self, room_id: str, payload: bytes) -> None:
        for handler in list(self._handlers.get(room_id, ())):
            handler(payload)

    def announce(self, room_id: str, sender_id: str, event: str) -> None:
        frame = encode({"type": "presence", "room_id": room_id, "event": event,
                        "sender_id": sender_id})
        self._deliver(room_id, encode_events([PresenceEvent(sender_id, frame)]))
