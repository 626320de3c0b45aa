"""The Redis Cluster broker (``redis+cluster://``): sharded pub/sub, presence in the rooms' slots.

Same contract and names as the ``redis://`` broker (redis.py): a room's
channel is ``{P:room}:chan`` and its presence keys are ``{P:room}:...``, all in
the room's hash slot, so one master carries everything of a room. Payloads go
out with ``SPUBLISH`` (classic PUBLISH would be copied to every node) through
the same publisher task as redis:// (redis_publisher.py; one pipeline per
master per batch), and the presence scripts announce with SPUBLISH too. Process-wide keys
(``{P}:rooms``) sit in a slot of their own and no script touches two slots.

Commands and scripts use redis-py's ``RedisCluster``. Its per-master pools
do not block: past ``max_connections`` a command fails at once
(MaxConnectionsError). The broker's own tasks are few (one presence worker,
one heartbeat, one publisher per master), so the pools get ``pool_size``
plus room for those, and the reads anyone may call at any concurrency
(``members``, ``rooms``, ``ping``) wait for one of ``pool_size`` slots,
at most ``timeout_s``, as a redis:// caller waits for a pooled connection. Subscriptions are this
project's own (cluster_pubsub.py): one connection per master with
subscribed rooms, resubscribed per master after a loss, a failover or a slot
move, then each room catches up from the store.

URL: ``redis+cluster://[user:password@]host:port[,host:port...]``, the
startup nodes (any of them answering is enough; the others are learned),
parsed by ``validate.parse_cluster_url`` as the config checked it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException

from .. import metrics
from ..validate import parse_cluster_url
from . import BrokerError, Handler
from .cluster_pubsub import ShardedSubscriber
from .redis_presence import RedisPresence
from .redis_publisher import _ERRORS, Outbox, _wrap, pipeline_send, publisher_loop, queue_publish
from .redis_scripts import Keys

__all__ = ["GatedPresence", "RedisClusterBroker"]

log = logging.getLogger(__name__)

_PUBLISH_QUEUE = 10_000
_OWN_CONNECTIONS = 16  # per master, beyond pool_size: the broker's own tasks


class GatedPresence:
    """The presence of a cluster broker whose reads wait for a read slot first."""

    def __init__(
        self,
        inner: RedisPresence,
        reading: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    ) -> None:
        self.inner = inner
        self._reading = reading

    def join(self, room_id: str, sender_id: str) -> None:
        self.inner.join(room_id, sender_id)

    def leave(self, room_id: str, sender_id: str) -> None:
        self.inner.leave(room_id, sender_id)

    async def members(self, room_id: str) -> list[str]:
        async with self._reading():
            return await self.inner.members(room_id)

    async def rooms(self) -> list[tuple[str, int]]:
        async with self._reading():
            return await self.inner.rooms()

    async def settle(self) -> None:
        await self.inner.settle()

    @property
    def reaped(self) -> int:
        return self.inner.reaped


class RedisClusterBroker:
    """Room channels over sharded pub/sub on a Redis Cluster; presence in the rooms' slots."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        server_id: str,
        pool_size: int = 32,
        timeout_s: float = 5.0,
        ping_interval_s: float = 1.0,
        heartbeat_s: float = 5.0,
        dead_after_s: float = 20.0,
    ) -> None:
        parsed = parse_cluster_url(url)
        self.url = url
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.node = f"{server_id}-{uuid.uuid4().hex[:8]}"
        self._r = aioredis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
            username=parsed.username,
            password=parsed.password,
            max_connections=pool_size + _OWN_CONNECTIONS,
            socket_connect_timeout=2,
            socket_timeout=timeout_s,
            socket_keepalive=True,
            # One retry after a connection error (redis-py re-reads the slot map
            # first). Not more: before each retry redis-py closes every connection
            # of every master, in-flight commands included.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
        )
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._sub = ShardedSubscriber(
            parsed.nodes,
            self.keys,
            self._dispatch,
            username=parsed.username,
            password=parsed.password,
            timeout_s=timeout_s,
            ping_interval_s=ping_interval_s,
        )
        self._readers = asyncio.Semaphore(pool_size)
        self._presence = RedisPresence(
            self._r,
            self.keys,
            self.node,
            subscribed=lambda: list(self._handlers),
            publish=self.publish,
            heartbeat_s=heartbeat_s,
            dead_after_s=dead_after_s,
            sharded=True,
        )
        # One publisher (queue, task) per master: a frozen or dead master delays
        # only its own rooms' publishes. Routing uses redis-py's slot map; a stale
        # choice only costs a MOVED, which the pipeline follows.
        self._outboxes: dict[str, Outbox] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def presence(self) -> GatedPresence:
        return GatedPresence(self._presence, self._reading)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """One of ``pool_size`` read slots, waited for at most ``timeout_s``."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._readers.acquire()
        except TimeoutError as exc:
            raise BrokerError(f"redis: no free connection within {self.timeout_s:g} s") from exc
        try:
            yield
        finally:
            self._readers.release()

    @property
    def connected(self) -> bool:
        return self._sub.up

    def masters(self) -> dict[str, int]:
        """Master ``host:port`` -> subscribed rooms it carries for this process."""
        return self._sub.masters()

    async def start(self) -> None:
        where = ",".join(f"{h}:{p}" for h, p in parse_cluster_url(self.url).nodes)
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self._r.initialize()
                await self._sub.start()
                await self._presence.start()
        except (*_ERRORS, BrokerError) as exc:
            await self._sub.close()
            await self._r.aclose()
            raise BrokerError(f"cannot reach the Redis Cluster at {where}: {exc}") from exc
        metrics.BROKER_UP.set(1)

    async def close(self, *, remove_presence: bool = True) -> None:
        """Settle and remove presence (announcing leaves), then stop every task."""
        await self._presence.close(remove=remove_presence)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for outbox in self._outboxes.values():
            while not outbox.empty():
                _, _, waiter = outbox.get_nowait()
                if not waiter.done():
                    waiter.set_exception(BrokerError("redis: broker closed"))
        self._outboxes.clear()
        await self._sub.close()
        await self._r.aclose()

    async def ping(self) -> None:
        async with self._reading():
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._r.ping(target_nodes=aioredis.RedisCluster.PRIMARIES)
            except _ERRORS as exc:
                raise _wrap(exc) from exc
        if not self._sub.up:
            raise BrokerError("redis cluster: some rooms are not subscribed (resubscribing)")

    def publish(self, room_id: str, payload: bytes) -> Awaitable[None]:
        channel = self.keys.channel(room_id)
        return queue_publish(self._outbox(channel), channel, payload, self.timeout_s)

    def _outbox(self, channel: str) -> Outbox:
        try:
            node = self._r.get_node_from_key(channel)
        except RedisClusterException:  # slot not covered (yet)
            node = None
        master = node.name if node is not None else ""
        outbox = self._outboxes.get(master)
        if outbox is None:
            outbox = self._outboxes[master] = asyncio.Queue(_PUBLISH_QUEUE)
            self._tasks.append(
                asyncio.create_task(
                    publisher_loop(outbox, pipeline_send(self._r, "SPUBLISH"), None),
                    name=f"redis-publisher-{master}",
                )
            )
        return outbox

    # The subscriber's lock (fair, FIFO) orders a room's SSUBSCRIBE and SUNSUBSCRIBE
    # as these calls were made; a subscribe waits for its confirmation outside it.

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        handlers = self._handlers[room_id]
        handlers.append(handler)
        if len(handlers) == 1:
            await self._sub.add(room_id)

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        handlers = self._handlers.get(room_id)
        if not handlers or handler not in handlers:
            return
        handlers.remove(handler)
        if not handlers:
            del self._handlers[room_id]
            await self._sub.remove(room_id)

    def _dispatch(self, room_id: str, payload: bytes | None) -> None:
        for handler in list(self._handlers.get(room_id, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("room handler failed", extra={"room_id": room_id})
