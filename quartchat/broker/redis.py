"""The Redis broker: room channels over one pub/sub connection, presence in Redis.

Names (``P`` = ``QUARTCHAT_REDIS_PREFIX``; see redis_scripts.py for all keys):
a room's channel is ``{P:room}:chan``, in the room's hash slot like its
presence keys; ``@control`` (process-wide messages) is ``{P:@control}:chan``.

Commands share one ``BlockingConnectionPool`` of ``pool_size`` connections:
a caller waits at most ``timeout_s`` for a connection (redis-py 8's plain
pool refuses at once past 100 with MaxConnectionsError). Publishes go
through one publisher task (redis_publisher.py) that writes whatever is
queued at once to a connection of its own; ``publish()`` returns once its payload was sent, and
raises BrokerError when sending failed or took longer than ``timeout_s``.

Pub/sub is at-most-once: when the connection drops, everything published in
the meantime is lost. The listener sends its own PING every
``ping_interval_s`` and treats ``3 x ping_interval_s`` without a pong or any
other message as a dead connection (redis-py's ``check_health`` discards the pong, and a
Redis that vanishes without a TCP reset would otherwise leave us deaf): it
reconnects with capped, jittered backoff, resubscribes every room in
batches, waits for the confirmations, then tells every handler ``None`` so
each room catches up from the store.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .. import metrics
from . import BrokerError, Handler
from .redis_presence import RedisPresence
from .redis_publisher import (
    _ERRORS,
    ConnectionSend,
    Outbox,
    _wrap,
    publisher_loop,
    queue_publish,
)
from .redis_pubsub import abort, drain
from .redis_scripts import Keys

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
_SUBSCRIBE_BATCH = 500
_PUBLISH_QUEUE = 10_000
_PING_TOKEN = b"quartchat-watchdog"


class RedisBroker:
    """Room channels over one pub/sub connection; presence in Redis."""

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
        self.url = url
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.ping_interval_s = ping_interval_s
        # Each process is its own presence node: workers of one server share its id.
        self.node = f"{server_id}-{uuid.uuid4().hex[:8]}"
        # A pooled connection may be stale after Redis restarted: retry a command on
        # a fresh connection before calling Redis down (a retried PUBLISH may arrive
        # twice; receivers drop duplicates by seq). Timeouts are not retried: waits
        # stay bounded by timeout_s.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout_s,
            socket_connect_timeout=2,
            socket_timeout=timeout_s,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=2),
            retry_on_error=[RedisConnectionError],
        )
        self._r: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # The publisher's own connection, with no socket_timeout: redis-py bounds a
        # send by running it in a task of its own (asyncio.wait_for, on Python 3.11),
        # which puts the PUBLISH behind everything else ready to run. The publisher
        # bounds each batch with asyncio.timeout instead (publisher_loop).
        pub_pool = aioredis.BlockingConnectionPool.from_url(
            url,
            timeout=timeout_s,
            socket_connect_timeout=2,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=2),
            retry_on_error=[RedisConnectionError],
        )
        # Set after from_url, which lets the URL's query string override keywords.
        pub_pool.connection_kwargs["socket_timeout"] = None
        pub_pool.max_connections = 1  # one batch in flight at a time
        self._pub: aioredis.Redis = aioredis.Redis(connection_pool=pub_pool)
        self._send = ConnectionSend(pub_pool, "PUBLISH")
        # The pub/sub connection must NOT retry silently: a reconnect means payloads
        # were lost, and the listener has to see it to make every room catch up.
        # RESP2: redis-py 8 (RESP3 by default) runs a push handler for every
        # payload, which asks logging for its logger each time (15 % of a get_message).
        self._sub_client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            protocol=2,
            socket_connect_timeout=2,
            socket_timeout=timeout_s,
            socket_keepalive=True,
            health_check_interval=0,
            retry=Retry(NoBackoff(), retries=0),
        )
        self._ps: PubSub | None = None
        self._dead: list[Any] = []  # aborted pub/sub connections, to release to their pool
        self._presence = RedisPresence(
            self._r,
            self.keys,
            self.node,
            subscribed=lambda: list(self._handlers),
            publish=self.publish,
            heartbeat_s=heartbeat_s,
            dead_after_s=dead_after_s,
        )
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._sub_lock = asyncio.Lock()
        self._outbox: Outbox = asyncio.Queue(_PUBLISH_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._last_pong = 0.0
        self._last_ping = 0.0
        self.connected = False

    @property
    def presence(self) -> RedisPresence:
        return self._presence

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self._r.ping()
                await self._connect_pubsub()
                await self._presence.start()
        except (*_ERRORS, BrokerError) as exc:
            raise BrokerError(f"cannot reach Redis at {self.url.split('@')[-1]}: {exc}") from exc
        self.connected = True
        metrics.BROKER_UP.set(1)
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis-listener"),
            asyncio.create_task(self._publisher(), name="redis-publisher"),
        ]

    async def close(self, *, remove_presence: bool = True) -> None:
        """Settle and remove presence (announcing leaves), then stop every task.

        ``remove_presence=False`` leaves this node's entries behind, as a process
        that died would (tests)."""
        await self._presence.close(remove=remove_presence)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while not self._outbox.empty():
            _, _, waiter = self._outbox.get_nowait()
            if not waiter.done():
                waiter.set_exception(BrokerError("redis: broker closed"))
        await self._drop_pubsub()
        await self._sub_client.aclose()
        # A client made on a pool of ours leaves the pool open on aclose().
        await self._pub.aclose(close_connection_pool=True)
        await self._r.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._r.ping()
        except _ERRORS as exc:
            raise _wrap(exc) from exc
        if not self.connected:
            raise BrokerError("redis: pub/sub connection is down (reconnecting)")

    # ---- publishing -------------------------------------------------------

    def publish(self, room_id: str, payload: bytes) -> Awaitable[None]:
        return queue_publish(self._outbox, self.keys.channel(room_id), payload, self.timeout_s)

    async def _publisher(self) -> None:
        await publisher_loop(self._outbox, self._send, self.timeout_s)

    # ---- channels ---------------------------------------------------------

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        channel = self.keys.channel(room_id).encode()
        async with self._sub_lock:
            handlers = self._handlers[room_id]
            handlers.append(handler)
            if len(handlers) > 1 or self._ps is None:
                return  # shared channel, or down: the reconnect subscribes and says None
            waiter = asyncio.get_running_loop().create_future()
            self._confirm[channel] = waiter
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._ps.subscribe(channel)
            except _ERRORS as exc:
                # Not fatal: the listener subscribes every room when Redis is back,
                # and then tells the handler to catch up from the store.
                self._confirm.pop(channel, None)
                log.warning("subscribe %s deferred: %s", room_id, exc)
                return
        # Wait for Redis to confirm, so that whatever is published after this
        # returns is delivered (the caller reads the store next).
        try:
            async with asyncio.timeout(self.timeout_s):
                await waiter
        except TimeoutError:
            log.warning("no subscribe confirmation for %s yet", room_id)
        finally:
            self._confirm.pop(channel, None)

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        async with self._sub_lock:
            handlers = self._handlers.get(room_id)
            if not handlers or handler not in handlers:
                return
            handlers.remove(handler)
            if handlers:
                return
            del self._handlers[room_id]
            if self._ps is None:
                return
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._ps.unsubscribe(self.keys.channel(room_id))
            except _ERRORS as exc:
                log.warning("unsubscribe %s failed: %s", room_id, exc)

    def _dispatch(self, room_id: str, payload: bytes | None) -> None:
        for handler in list(self._handlers.get(room_id, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("room handler failed", extra={"room_id": room_id})

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if kind == "pong":
            self._last_pong = time.monotonic()
        elif kind == "message" and isinstance(channel, bytes):
            room_id = self.keys.room_of(channel)
            if room_id is not None:
                self._dispatch(room_id, message["data"])
        elif kind == "subscribe" and isinstance(channel, bytes):
            waiter = self._confirm.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # ---- the listener and its watchdog ---------------------------------------

    async def _listen(self) -> None:
        """The one receive loop: demultiplex payloads to rooms; ping; reconnect on loss."""
        backoff = _BACKOFF_MIN_S
        while True:
            if self._ps is None:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                await self._reconnect()
                continue
            try:
                async with asyncio.timeout(self.timeout_s):
                    message = await self._ps.get_message(timeout=self.ping_interval_s / 2)
                    if message is not None:
                        # Anything heard proves the connection alive: under a backlog
                        # the pong waits behind thousands of payloads.
                        self._last_pong = time.monotonic()
                        self._on_message(message)
                        # The replies read along with it, straight from the parser.
                        if await drain(self._ps, self._on_message):
                            self._last_pong = time.monotonic()
                    now = time.monotonic()
                    if now - self._last_ping >= self.ping_interval_s:
                        self._last_ping = now
                        await self._ps.ping(_PING_TOKEN)
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
                continue
            if time.monotonic() - self._last_pong > 3 * self.ping_interval_s:
                self._lost(f"no pong for {3 * self.ping_interval_s:g} s")
                continue
            backoff = _BACKOFF_MIN_S

    def _lost(self, why: str) -> None:
        if self.connected:
            log.warning("redis pub/sub connection lost: %s", why)
            self.connected = False
            metrics.BROKER_UP.set(0)
        self._drop_ps()

    def _drop_ps(self) -> None:
        ps, self._ps = self._ps, None
        if ps is not None:
            conn = abort(ps)
            if conn is not None:
                self._dead.append(conn)  # back to its pool at the next connect

    async def _reconnect(self) -> None:
        try:
            rooms = await self._connect_pubsub()
        except _ERRORS as exc:
            log.debug("redis reconnect failed: %s", exc)
            await self._drop_pubsub()
            return
        self.connected = True
        metrics.BROKER_UP.set(1)
        metrics.BROKER_RECONNECTS.inc()
        metrics.BROKER_RESUBSCRIBES.inc(len(rooms))
        log.info("redis pub/sub reconnected; %d rooms resubscribed", len(rooms))
        self._presence.reconnected()  # re-add our entries if Redis lost them
        for room_id in rooms:
            self._dispatch(room_id, None)  # anything may have been lost: catch up

    async def _connect_pubsub(self) -> list[str]:
        """A fresh pub/sub connection subscribed to every room; -> the rooms."""
        async with self._sub_lock:
            dead, self._dead = self._dead, []
            for conn in dead:
                await self._sub_client.connection_pool.release(conn)
            ps = self._sub_client.pubsub()
            self._ps = ps
            async with asyncio.timeout(self.timeout_s):
                await ps.connect()  # type: ignore[no-untyped-call]
                self._last_pong = self._last_ping = time.monotonic()
                rooms = list(self._handlers)
                channels = [self.keys.channel(r).encode() for r in rooms]
                for start in range(0, len(channels), _SUBSCRIBE_BATCH):
                    await ps.subscribe(*channels[start : start + _SUBSCRIBE_BATCH])
                # Confirmed before anyone is told to catch up: what is published
                # after a room's store read is then delivered.
                pending = set(channels)
                while pending:
                    message = await ps.get_message(timeout=self.timeout_s)
                    if message is None:
                        raise TimeoutError("no subscribe confirmation")
                    if message.get("type") == "subscribe":
                        pending.discard(message.get("channel"))
                    self._on_message(message)
        return rooms

    async def _drop_pubsub(self) -> None:
        self._drop_ps()
        dead, self._dead = self._dead, []
        for conn in dead:
            await self._sub_client.connection_pool.release(conn)
