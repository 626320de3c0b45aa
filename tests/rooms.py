"""Shared helpers of the room tests: joining a fake client, and messages that
another server stored (with the broker payload it would have published)."""

from __future__ import annotations

import uuid
from typing import Any

from quartchat.events import MessageEvent, encode_events
from quartchat.hub import Hub
from quartchat.room import Join
from quartchat.room.frames import encode_row
from quartchat.store import NewMessage, StoredMessage
from quartchat.store.database import DatabaseStore

from .fakes import Client


async def join(hub: Hub, c: Client, room: str, **kw: Any) -> dict[str, Any]:
    """Join as the route does (room set first), and return the ``joined`` frame."""
    before = len(c.socket.of("joined"))
    c.conn.rooms.add(room)
    hub.submit(room, Join(c.conn, **kw))
    frames = await c.socket.next_of("joined", before + 1)
    return frames[-1]


async def stored_elsewhere(hub: Hub, count: int, room: str) -> list[StoredMessage]:
    """Messages another server stored (its own store on the same database); no
    notification of them reached ``hub``."""
    other = DatabaseStore(hub.store.url)  # type: ignore[attr-defined]
    await other.connect()
    try:
        answers = await other.append(
            room,
            [
                NewMessage(uuid.uuid4().hex, "remote", f"c{i}", None, 1_700_000_000_000 + i)
                for i in range(count)
            ],
        )
    finally:
        await other.close()
    return [a.row for a in answers]


def payload_of(row: StoredMessage) -> bytes:
    """The broker payload the storing server publishes for ``row``."""
    return encode_events([MessageEvent(row.seq, row.sent_at_ms, encode_row(row))])
