"""The broker seam: fan-out of room events between processes, seqs, and presence.

A :class:`Broker` is chosen by URL: ``memory://`` (one process, the embedded
default) or ``redis://`` (any number of processes and hosts). The Redis
implementation is imported lazily so the embedded mode needs no Redis client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Handler", "SeqFloor", "Broker", "Presence", "BrokerError", "create_broker"]

# Called with each payload published to a subscribed room, or with None when
# the broker may have lost payloads (a reconnect): the subscriber must then
# catch up from the store. It must not block.
Handler = Callable[[bytes | None], None]

# Returns the room's highest stored seq; used to seed or re-seed a sequence.
SeqFloor = Callable[[], Awaitable[int]]


class BrokerError(Exception):
    """The broker could not be reached or refused the operation."""


class Presence(Protocol):
    """Which senders are in which rooms, across every server of the deployment."""

    async def add(self, room_id: str, sender_id: str) -> bool:
        """Count this server's first connection of ``sender_id`` in; True if first anywhere."""

    async def remove(self, room_id: str, sender_id: str) -> bool:
        """Count this server's last connection of ``sender_id`` out; True if last anywhere."""

    async def members(self, room_id: str) -> list[str]:
        """Sender ids present in the room, each once, sorted."""

    async def rooms(self) -> list[tuple[str, int]]:
        """(room_id, member count) for rooms with at least one member."""


class Broker(Protocol):
    """Room channels, the seq sequencer, and presence."""

    presence: Presence

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`BrokerError` unless the broker answers."""

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        """Deliver the room's payloads to ``handler``; returns once subscribed."""

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        """Stop delivering to ``handler``."""

    async def publish(self, room_id: str, payload: bytes) -> None:
        """Send ``payload`` to every subscriber of the room on every server."""

    async def next_seqs(self, room_id: str, count: int, floor: SeqFloor) -> int:
        """Reserve ``count`` consecutive seqs; returns the last. Never goes backwards."""

    async def reseed(self, room_id: str, floor: SeqFloor) -> None:
        """Raise the room's sequence to at least ``floor()`` (after a duplicate seq)."""


def create_broker(settings: Settings) -> Broker:
    """The broker for ``settings.broker_url``, by scheme."""
    url = settings.broker_url
    if url == "memory://":
        from .memory import MemoryBroker

        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url, prefix=settings.redis_prefix, server_id=settings.server_id)
    raise ValueError(f"unsupported broker URL {url!r}")
