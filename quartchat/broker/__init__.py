"""The broker seam: fan-out of room events between processes, and presence.

Two small protocols, and their composition:

- :class:`PubSub`: room channels (``subscribe``/``unsubscribe``/``publish``),
  plus the connection's life (``start``/``close``/``ping``). Payloads are
  opaque bytes here; what rooms put in them is events.py's business.
- :class:`Presence`: who is in which room, on any live server.
- :class:`Broker`: a :class:`PubSub` whose ``presence`` is a :class:`Presence`,
  what the hub, the rooms and the control channel are handed. A component
  that only publishes (the room's writer) takes a :class:`PubSub`.

A broker is chosen by URL: ``memory://`` (one process, the embedded
default), ``redis://`` (any number of processes and hosts) or
``redis+cluster://`` (a Redis Cluster: sharded pub/sub). The Redis
implementations are imported lazily so the embedded mode needs no Redis client.
Each one is checked against these protocols by ``mypy --strict`` (the
``TYPE_CHECKING`` block at the end of this module).

Seqs are not the broker's business (the store assigns them). Presence is: the
broker keeps this process's local presence table (what rooms told it through
``join``/``leave``), applies it to the shared view in the background, and
announces first-anywhere / last-anywhere changes as presence events
(``events.PresenceEvent``: a sender id and ``join``/``leave``, no client frame)
on the room's own channel, so every subscriber of the room hears them in order
with its messages; the room builds the ``presence`` frame its members get.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from ..logs import redact
from ..validate import is_memory_url, is_redis_cluster_url, is_redis_url

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Broker", "BrokerError", "Handler", "Presence", "PubSub", "create_broker"]

# Called with each payload published to a subscribed room, or with None when
# the broker may have lost payloads (a reconnect): the subscriber must then
# catch up from the store. It must not block.
Handler = Callable[[bytes | None], None]


class BrokerError(Exception):
    """The broker could not be reached or refused the operation."""


class PubSub(Protocol):
    """Room channels: every payload published to a room reaches its subscribers on every server."""

    async def start(self) -> None:
        """Connect (:class:`BrokerError` if the broker cannot be reached)."""

    async def close(self) -> None:
        """Stop delivering and release the connections (a broker also settles presence)."""

    async def ping(self) -> None:
        """Raise :class:`BrokerError` unless the broker answers."""

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        """Deliver the room's payloads to ``handler``; returns once subscribed."""

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        """Stop delivering to ``handler``."""

    def publish(self, room_id: str, payload: bytes) -> Awaitable[None]:
        """Send ``payload`` to every subscriber of the room on every server.

        The payload is queued (or, in one process, delivered) before this returns,
        in call order; the awaitable completes once it is sent, or raises
        :class:`BrokerError` on failure or after a bounded wait. An ``async def``
        is a valid implementation (it only queues once awaited)."""


class Presence(Protocol):
    """Cluster-wide presence. Calls from rooms never block and never fail."""

    def join(self, room_id: str, sender_id: str) -> None:
        """This process's first local connection of ``sender_id`` entered ``room_id``.

        Queued and applied in the background (retried until applied); when it
        makes the sender present anywhere for the first time, a ``join``
        presence event is published on the room's channel."""

    def leave(self, room_id: str, sender_id: str) -> None:
        """This process's last local connection of ``sender_id`` left ``room_id``.

        Same queueing; ``leave`` is announced when the sender is present
        nowhere any more. A join and leave not yet applied cancel out."""

    async def members(self, room_id: str) -> list[str]:
        """Sender ids present in the room on live servers, each once, sorted (BrokerError)."""

    async def rooms(self) -> list[tuple[str, int]]:
        """(room_id, member count) for rooms with at least one member (BrokerError)."""

    async def settle(self) -> None:
        """Return once every change queued before the call is applied (bounded while down)."""


class Broker(PubSub, Protocol):
    """Room channels and presence: what a server is built with.

    ``close()`` also settles presence (bounded), removes this process's
    entries and announces their leaves."""

    @property
    def presence(self) -> Presence: ...


def create_broker(settings: Settings) -> Broker:
    """The broker for ``settings.broker_url``, by scheme."""
    url = settings.broker_url
    if is_memory_url(url):
        from .memory import MemoryBroker

        return MemoryBroker()
    if is_redis_cluster_url(url):
        from .redis_cluster import RedisClusterBroker

        return RedisClusterBroker(
            url,
            prefix=settings.redis_prefix,
            server_id=settings.server_id,
            pool_size=settings.redis_pool_size,
            timeout_s=settings.redis_timeout_s,
        )
    if is_redis_url(url):
        from .redis import RedisBroker

        return RedisBroker(
            url,
            prefix=settings.redis_prefix,
            server_id=settings.server_id,
            pool_size=settings.redis_pool_size,
            timeout_s=settings.redis_timeout_s,
        )
    raise ValueError(f"unsupported broker URL {redact(url)!r}")


if TYPE_CHECKING:
    # mypy --strict checks every implementation against the protocols here: a
    # missing or mistyped method fails the type check, not a test at run time.
    from .memory import MemoryBroker, MemoryPresence
    from .redis import RedisBroker
    from .redis_cluster import GatedPresence, RedisClusterBroker
    from .redis_presence import RedisPresence

    _BROKERS: tuple[type[Broker], ...] = (MemoryBroker, RedisBroker, RedisClusterBroker)
    _PRESENCES: tuple[type[Presence], ...] = (MemoryPresence, RedisPresence, GatedPresence)
