"""The broker seam: fan-out of room events between processes, and presence.

A :class:`Broker` is chosen by URL: ``memory://`` (one process, the embedded
default) or ``redis://`` (any number of processes and hosts). The Redis
implementation is imported lazily so the embedded mode needs no Redis client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Handler", "Broker", "Presence", "BrokerError", "create_broker"]

# Called with each payload published to a subscribed room, or with None when
# the broker may have lost payloads (a reconnect): the subscriber must then
# catch up from the store. It must not block.
Handler = Callable[[bytes | None], None]

class BrokerError(Exception):
    """The broker could not be reached or refused the operation."""


class Presence(Protocol):
    """Which senders are in which rooms, across every server of the deployment.

    ``join`` and ``leave`` never block and never fail: the broker applies
    them in the background (retrying), and announces a sender's first
    connection in and last connection out anywhere with a ``presence``
    payload on the room's channel.
    """

    def join(self, room_id: str, sender_id: str) -> None:
        """This process's first connection of ``sender_id`` entered ``room_id``."""

    def leave(self, room_id: str, sender_id: str) -> None:
        """This process's last connection of ``sender_id`` left ``room_id``."""

    async def members(self, room_id: str) -> list[str]:
        """Sender ids present in the room (live servers only), each once, sorted."""

    async def rooms(self) -> list[tuple[str, int]]:
        """(room_id, member count) for rooms with at least one member."""

    async def settle(self) -> None:
        """Return once the changes queued before the call are applied (bounded)."""


class Broker(Protocol):
    """Room channels and presence."""

    @property
    def presence(self) -> Presence: ...

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
