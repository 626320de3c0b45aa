"""The Redis broker: one pub/sub connection per process, seqs by INCRBY, presence in Redis.

Keys and channels all start with ``QUARTCHAT_REDIS_PREFIX`` (``P`` below):

- ``P:room:<room>``            pub/sub channel of a room
- ``P:seq:<room>``             the room's sequence counter (INCRBY)
- ``P:members:<room>``         hash sender_id -> number of server processes it is on
- ``P:rooms``                  set of rooms that have (or recently had) members
- ``P:node:<node>``            set of ``room\\x00sender`` this process holds
- ``P:nodes``                  zset node -> last heartbeat (unix seconds)
- ``P:lock:...``               redis-py ``Lock`` names

Pub/sub is at-most-once: when the connection drops, everything published in
the meantime is lost. The listener reconnects with capped, jittered backoff,
resubscribes every room, then tells every handler ``None`` so each actor
catches up from the store. The sequencer never goes backwards: a counter that
Redis lost is re-seeded from the store's max seq under a lock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from ..events import PresenceEvent, encode_events
from ..protocol import encode
from collections.abc import Awaitable, Callable

from . import BrokerError, Handler

SeqFloor = Callable[[], Awaitable[int]]  # TEMP until the broker rework lands

__all__ = ["RedisBroker", "RedisPresence"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
NODE_DEAD_AFTER_S = 15.0
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 5.0
_SUBSCRIBE_WAIT_S = 3.0
_LOCK_TIMEOUT_S = 30.0

# Take ARGV[1] seqs if the counter exists; -1 if it does not (a new room, or
# Redis lost it): the caller then seeds it from the store first. Checking and
# taking in one script means no seq is ever taken from a counter about to be
# re-seeded (such a seq would never be stored, and every server would wait
# for it until the skip timeout).
_NEXT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return -1
"""

# Raise the counter to at least ARGV[1], then take ARGV[2] seqs.
_RESEED_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then redis.call('SET', KEYS[1], floor) end
return redis.call('INCRBY', KEYS[1], ARGV[2])
"""

# KEYS: node set, members hash, rooms set. ARGV: entry, sender, room. -> 1 if first anywhere
_ADD_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('SADD', KEYS[3], ARGV[3])
  if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then return 1 end
end
return 0
"""

# KEYS: node set, members hash, rooms set. ARGV: entry, sender, room. -> 1 if last anywhere
_REMOVE_LUA = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    if redis.call('HLEN', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
    return 1
  end
end
return 0
"""


def _wrap(exc: BaseException) -> BrokerError:
    return BrokerError(f"redis: {type(exc).__name__}: {exc}")


class RedisPresence:
    """Cluster-wide presence: per-room member counts, per-process entry sets, heartbeats."""

    def __init__(self, client: aioredis.Redis, prefix: str, node: str) -> None:
        self._r = client
        self._p = prefix
        self.node = node
        self._add = client.register_script(_ADD_LUA)
        self._remove = client.register_script(_REMOVE_LUA)
        self._pending: set[asyncio.Task[None]] = set()
        self.publish: Any = None

    def _keys(self, room_id: str) -> list[str]:
        return [f"{self._p}:node:{self.node}", f"{self._p}:members:{room_id}", f"{self._p}:rooms"]

    # TEMP(lead): the non-blocking interface on top of add/remove until the broker rework lands.
    def join(self, room_id: str, sender_id: str) -> None:
        self._later(self.add, room_id, sender_id, "join")

    def leave(self, room_id: str, sender_id: str) -> None:
        self._later(self.remove, room_id, sender_id, "leave")

    def _later(self, op: Any, room_id: str, sender_id: str, event: str) -> None:
        async def run() -> None:
            try:
                if await op(room_id, sender_id) and self.publish is not None:
                    frame = encode({"type": "presence", "room_id": room_id, "event": event,
                                    "sender_id": sender_id})
                    await self.publish(room_id, encode_events([PresenceEvent(sender_id, frame)]))
            except BrokerError as exc:
                log.warning("presence %s failed: %s", event, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=2)

    async def add(self, room_id: str, sender_id: str) -> bool:
        try:
            first = await self._add(keys=self._keys(room_id),
                                    args=[f"{room_id}\x00{sender_id}", sender_id, room_id])
        except RedisError as exc:
            raise _wrap(exc) from exc
        return bool(first)

    async def remove(self, room_id: str, sender_id: str) -> bool:
        try:
            last = await self._remove(keys=self._keys(room_id),
                                      args=[f"{room_id}\x00{sender_id}", sender_id, room_id])
        except RedisError as exc:
            raise _wrap(exc) from exc
        return bool(last)

    async def members(self, room_id: str) -> list[str]:
        try:
            names = await self._r.hkeys(f"{self._p}:members:{room_id}")
        except RedisError as exc:
            raise _wrap(exc) from exc
        return sorted(n.decode() for n in names)

    async def rooms(self) -> list[tuple[str, int]]:
        try:
            rooms = sorted(r.decode() for r in await self._r.smembers(f"{self._p}:rooms"))
            async with self._r.pipeline(transaction=False) as pipe:
                for room in rooms:
                    pipe.hlen(f"{self._p}:members:{room}")
                counts = await pipe.execute()
        except RedisError as exc:
            raise _wrap(exc) from exc
        return [(room, int(n)) for room, n in zip(rooms, counts) if int(n) > 0]

    async def heartbeat(self) -> None:
        await self._r.zadd(f"{self._p}:nodes", {self.node: time.time()})

    async def reap(self, publish: Any) -> int:
        """Remove the members of processes whose heartbeat stopped; announce their leaves."""
        deadline = time.time() - NODE_DEAD_AFTER_S
        dead = [n.decode() for n in await self._r.zrangebyscore(f"{self._p}:nodes", "-inf", deadline)]
        gone = 0
        for node in dead:
            if node == self.node:
                continue
            lock = self._r.lock(f"{self._p}:lock:reap:{node}", timeout=_LOCK_TIMEOUT_S,
                                blocking_timeout=0.1)
            if not await lock.acquire():
                continue  # another process is reaping it
            try:
                key = f"{self._p}:node:{node}"
                for entry in await self._r.smembers(key):
                    room_id, _, sender = entry.decode().partition("\x00")
                    last = await self._remove(
                        keys=[key, f"{self._p}:members:{room_id}", f"{self._p}:rooms"],
                        args=[entry, sender, room_id],
                    )
                    if last:
                        gone += 1
                        frame = encode({"type": "presence", "room_id": room_id, "event": "leave",
                                        "sender_id": sender})
                        await publish(room_id, encode_events([PresenceEvent(sender, frame)]))
                await self._r.delete(key)
                await self._r.zrem(f"{self._p}:nodes", node)
                log.info("reaped dead server process %s (%d members left)", node, gone)
            finally:
                try:
                    await lock.release()
                except RedisError:
                    pass
        return gone

    async def leave_all(self) -> None:
        """Forget this process's heartbeat (its members were removed by their rooms)."""
        await self._r.zrem(f"{self._p}:nodes", self.node)


class RedisBroker:
    """Room channels over one pub/sub connection; seqs and presence in Redis."""

    def __init__(self, url: str, *, prefix: str, server_id: str) -> None:
        self.url = url
        self.prefix = prefix
        # Each process is its own presence node: workers of one server share its id.
        self.node = f"{server_id}-{uuid.uuid4().hex[:8]}"
        # A pooled connection may be stale after Redis restarted: retry a command a
        # few times on a fresh connection before calling Redis down. (A retried
        # PUBLISH may arrive twice; receivers drop duplicates by seq.)
        self._r: aioredis.Redis = aioredis.Redis.from_url(
            url, health_check_interval=10, socket_connect_timeout=2, socket_timeout=5,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        # The pub/sub connection must NOT retry silently: a reconnect means payloads
        # were lost, and the listener has to see it to make every room catch up.
        self._sub_client: aioredis.Redis = aioredis.Redis.from_url(
            url, health_check_interval=10, socket_connect_timeout=2, socket_keepalive=True,
            retry=Retry(NoBackoff(), retries=0),
        )
        self._pubsub = self._sub_client.pubsub()
        self._presence = RedisPresence(self._r, prefix, self.node)
        self._presence.publish = self.publish
        self._reseed_script = self._r.register_script(_RESEED_LUA)
        self._next_script = self._r.register_script(_NEXT_LUA)
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._sub_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = False

    @property
    def presence(self) -> RedisPresence:
        return self._presence

    def _channel(self, room_id: str) -> str:
        return f"{self.prefix}:room:{room_id}"

    def _room_of(self, channel: bytes) -> str | None:
        head = f"{self.prefix}:room:".encode()
        return channel[len(head):].decode() if channel.startswith(head) else None

    async def start(self) -> None:
        try:
            await self._r.ping()
            await self._pubsub.connect()
            await self.presence.heartbeat()
        except (RedisError, OSError) as exc:
            raise BrokerError(f"cannot reach Redis at {self.url.split('@')[-1]}: {exc}") from exc
        self.connected = True
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis-listener"),
            asyncio.create_task(self._housekeeping(), name="redis-heartbeat"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.presence.settle()
        try:
            await self.presence.leave_all()
        except (RedisError, OSError):
            pass
        try:
            await self._pubsub.aclose()
            await self._sub_client.aclose()
        finally:
            await self._r.aclose()

    async def ping(self) -> None:
        try:
            await self._r.ping()
        except (RedisError, OSError) as exc:
            raise _wrap(exc) from exc
        if not self.connected:
            raise BrokerError("redis: pub/sub connection is down (reconnecting)")

    # ---- channels ---------------------------------------------------------

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        async with self._sub_lock:
            handlers = self._handlers[room_id]
            handlers.append(handler)
            if len(handlers) > 1:
                return
            channel = self._channel(room_id)
            waiter = asyncio.get_running_loop().create_future()
            self._confirm[channel.encode()] = waiter
            try:
                await self._pubsub.subscribe(channel)
            except (RedisError, OSError) as exc:
                # Not fatal: the listener subscribes every room when Redis is back,
                # and then tells the handler to catch up from the store.
                self._confirm.pop(channel.encode(), None)
                log.warning("subscribe %s deferred: %s", room_id, exc)
                return
        # Wait for Redis to confirm, so that whatever is published after this
        # returns is delivered (the caller reads the store next).
        try:
            async with asyncio.timeout(_SUBSCRIBE_WAIT_S):
                await waiter
        except TimeoutError:
            log.warning("no subscribe confirmation for %s yet", room_id)
        finally:
            self._confirm.pop(channel.encode(), None)

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        async with self._sub_lock:
            handlers = self._handlers.get(room_id)
            if not handlers or handler not in handlers:
                return
            handlers.remove(handler)
            if handlers:
                return
            del self._handlers[room_id]
            try:
                await self._pubsub.unsubscribe(self._channel(room_id))
            except (RedisError, OSError) as exc:
                log.warning("unsubscribe %s failed: %s", room_id, exc)

    async def publish(self, room_id: str, payload: bytes) -> None:
        try:
            await self._r.publish(self._channel(room_id), payload)
        except (RedisError, OSError) as exc:
            raise _wrap(exc) from exc

    def _dispatch(self, room_id: str, payload: bytes | None) -> None:
        for handler in list(self._handlers.get(room_id, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("room handler failed", extra={"room_id": room_id})

    async def _listen(self) -> None:
        """The one receive loop: demultiplex payloads to rooms; reconnect on loss."""
        backoff = _BACKOFF_MIN_S
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, RuntimeError) as exc:
                if self.connected:
                    log.warning("redis pub/sub connection lost: %s", exc)
                    self.connected = False
                    metrics.BROKER_UP.set(0)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                await self._reconnect()
                continue
            backoff = _BACKOFF_MIN_S
            if message is None:
                continue
            kind = message.get("type")
            channel = message.get("channel")
            if kind == "message" and isinstance(channel, bytes):
                room_id = self._room_of(channel)
                if room_id is not None:
                    self._dispatch(room_id, message["data"])
            elif kind == "subscribe" and isinstance(channel, bytes):
                waiter = self._confirm.get(channel)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def _reconnect(self) -> None:
        """Reconnect the pub/sub connection and resubscribe every active room."""
        try:
            await self._pubsub.ping()  # reconnects; redis-py resubscribes known channels
            rooms = list(self._handlers)
            if rooms:
                # Subscribing again is harmless, and covers channels whose first
                # SUBSCRIBE failed while Redis was down.
                await self._pubsub.subscribe(*(self._channel(r) for r in rooms))
        except (RedisError, OSError, RuntimeError) as exc:
            log.debug("redis reconnect failed: %s", exc)
            return
        self.connected = True
        metrics.BROKER_UP.set(1)
        metrics.BROKER_RECONNECTS.inc()
        metrics.BROKER_RESUBSCRIBES.inc(len(rooms))
        log.info("redis pub/sub reconnected; %d rooms resubscribed", len(rooms))
        for room_id in rooms:
            self._dispatch(room_id, None)  # anything may have been lost: catch up

    async def _housekeeping(self) -> None:
        """Heartbeat this process and reap the presence of dead ones."""
        while True:
            await asyncio.sleep(HEARTBEAT_S * (0.8 + 0.4 * random.random()))
            try:
                await self.presence.heartbeat()
                await self.presence.reap(self.publish)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, BrokerError) as exc:
                log.warning("presence housekeeping failed: %s", exc)

    # ---- sequencer --------------------------------------------------------

    async def next_seqs(self, room_id: str, count: int, floor: SeqFloor) -> int:
        key = f"{self.prefix}:seq:{room_id}"
        try:
            last = int(await self._next_script(keys=[key], args=[count]))
        except (RedisError, OSError) as exc:
            raise _wrap(exc) from exc
        if last >= 0:
            return last
        # No counter: a new room, or Redis lost it. Never go backwards: seed it
        # from the store's max (concurrent seeders agree: the script only raises).
        return await self._raise_to(room_id, await floor(), count)

    async def reseed(self, room_id: str, floor: SeqFloor) -> None:
        stored = await floor()
        await self._raise_to(room_id, stored, 0)

    async def _raise_to(self, room_id: str, stored: int, count: int) -> int:
        key = f"{self.prefix}:seq:{room_id}"
        try:
            async with self._r.lock(f"{self.prefix}:lock:seq:{room_id}", timeout=_LOCK_TIMEOUT_S,
                                    blocking_timeout=10):
                if stored > 0:
                    log.warning("seeding room sequence to >= %d", stored,
                                extra={"room_id": room_id})
                return int(await self._reseed_script(keys=[key], args=[stored, count]))
        except (RedisError, OSError) as exc:
            raise _wrap(exc) from exc
