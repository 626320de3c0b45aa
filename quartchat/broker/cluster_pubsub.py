"""Sharded pub/sub on a Redis Cluster: one connection per master that owns subscribed rooms.

A room's channel ``{P:room}:chan`` lives in the room's hash slot; the master
owning that slot is the only node that carries it (``SSUBSCRIBE`` /
``SPUBLISH``). This module keeps one :class:`Link` per master with
subscribed rooms and reads what each one hears, which room went to which
link, and the set of rooms that are wanted but not subscribed anywhere right
now (``_stale``). The slot map and the links themselves are cluster_nodes.py's.

A room becomes stale when its link is lost (an error, or the watchdog: no
pong or message for ``3 x ping_interval_s``), when its master answers
``MOVED`` (the slot is elsewhere), or when the master pushes an
``sunsubscribe`` we did not ask for (the slot moved away: a migration or a
failover). One supervisor task then refreshes the slot map, subscribes the
stale rooms on their owners in batches (one ``SSUBSCRIBE`` per slot, the
commands of a node written together), waits for the confirmations, and only
then tells each recovered room ``None``: whatever was published while it was
not subscribed must be read from the store.

redis-py's own ``ClusterPubSub`` is not used: it resubscribes silently after a
reconnect or a ``MOVED`` (the rooms would never hear that they missed
payloads), and its connections speak RESP3 by default, where the
``ssubscribe`` / ``sunsubscribe`` pushes do not reach ``read_response``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from redis.crc import key_slot
from redis.exceptions import MovedError, ResponseError

from .. import metrics
from . import BrokerError
from .cluster_nodes import _ERRORS, Address, Link, SlotMap
from .redis_scripts import Keys

__all__ = ["ShardedSubscriber"]

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 1.0  # a failover takes seconds: look again at least every second
_PING_TOKEN = b"quartchat-watchdog"


class ShardedSubscriber:
    """Rooms subscribed with SSUBSCRIBE on the masters that own their slots."""

    def __init__(
        self,
        startup: list[Address],
        keys: Keys,
        dispatch: Callable[[str, bytes | None], None],
        *,
        username: str | None,
        password: str | None,
        timeout_s: float,
        ping_interval_s: float,
    ) -> None:
        self._keys = keys
        self._dispatch = dispatch
        self.timeout_s = timeout_s
        self.ping_interval_s = ping_interval_s
        self._map = SlotMap(startup, username=username, password=password, timeout_s=timeout_s)
        self._rooms: set[str] = set()  # wanted
        self._home: dict[str, Link] = {}  # room -> link its SSUBSCRIBE went to
        self._links: dict[str, Link] = {}
        self._stale: set[str] = set()  # wanted, not subscribed: resubscribe, then None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await self._map.refresh(self._links)
        self.connected = True
        self._task = asyncio.create_task(self._supervise(), name="cluster-pubsub")

    async def close(self) -> None:
        tasks = [t for t in [self._task, *(link.task for link in self._links.values())] if t]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for link in self._links.values():
            link.abort()
        self._links.clear()
        self._task = None

    @property
    def up(self) -> bool:
        """Every wanted room is subscribed (or on its way, after a fresh subscribe)."""
        return self.connected and not self._stale

    def masters(self) -> dict[str, int]:
        """Master name -> number of subscribed rooms it carries (tests, metrics)."""
        out: dict[str, int] = dict.fromkeys(self._map.addrs, 0)
        for link in self._home.values():
            out[link.name] = out.get(link.name, 0) + 1
        return out

    # ---- what the broker calls ---------------------------------------------

    async def add(self, room_id: str) -> None:
        """Subscribe the room; returns once its master confirmed (bounded by timeout_s)."""
        channel = self._keys.channel(room_id).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        async with self._lock:
            self._rooms.add(room_id)
            self._confirm[channel] = waiter
            try:
                async with asyncio.timeout(self.timeout_s):
                    link = await self._link(self._owner(room_id))
                    await self._subscribe(link, [room_id])
            except _ERRORS as exc:
                # Not fatal: the supervisor subscribes it when its master answers,
                # and then tells the room to catch up from the store.
                self._confirm.pop(channel, None)
                self._make_stale([room_id])
                log.warning("subscribe %s deferred: %s", room_id, exc)
                return
        try:
            async with asyncio.timeout(self.timeout_s):
                await waiter
        except TimeoutError:
            # Refused (CLUSTERDOWN, ...) or lost: the supervisor tries again and then
            # tells the room to catch up.
            log.warning("no subscribe confirmation for %s yet", room_id)
            async with self._lock:
                if room_id in self._rooms and not waiter.done():
                    self._make_stale([room_id])
        finally:
            if self._confirm.get(channel) is waiter:
                del self._confirm[channel]

    async def remove(self, room_id: str) -> None:
        async with self._lock:
            self._rooms.discard(room_id)
            self._stale.discard(room_id)
            link = self._home.pop(room_id, None)
            if link is None or not link.alive:
                return
            link.rooms.discard(room_id)
            channel = self._keys.channel(room_id).encode()
            link.leaving.add(channel)
            try:
                async with asyncio.timeout(self.timeout_s):
                    await link.send([("SUNSUBSCRIBE", channel)])
            except _ERRORS as exc:
                log.warning("unsubscribe %s failed: %s", room_id, exc)

    # ---- links --------------------------------------------------------------------

    def _owner(self, room_id: str) -> str:
        channel = self._chan(room_id)
        owner = self._map.owner(channel)
        if not owner:
            raise BrokerError(f"redis cluster: slot {key_slot(channel)} is not covered")
        return owner

    async def _link(self, name: str) -> Link:
        link = self._links.get(name)
        if link is not None and link.alive:
            return link
        conn = self._map.connection(self._map.addrs[name])
        await conn.connect()  # type: ignore[no-untyped-call]
        link = Link(name, conn)
        self._links[name] = link
        link.task = asyncio.create_task(self._listen(link), name=f"cluster-pubsub-{name}")
        metrics.BROKER_NODE_UP.labels(name).set(1)
        metrics.BROKER_NODE_RECONNECTS.labels(name).inc()
        return link

    async def _subscribe(self, link: Link, rooms: Iterable[str]) -> None:
        """SSUBSCRIBE the rooms on ``link``: one command per slot, written in batches."""
        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for room_id in rooms:
            channel = self._keys.channel(room_id).encode()
            by_slot[key_slot(channel)].append(channel)
            link.rooms.add(room_id)
            self._home[room_id] = link
        await link.send([("SSUBSCRIBE", *channels) for channels in by_slot.values()])

    def _make_stale(self, rooms: Iterable[str]) -> None:
        for room_id in rooms:
            if room_id in self._rooms:
                self._stale.add(room_id)
        if self._stale:
            self._kick.set()

    def _lost(self, link: Link, why: str) -> None:
        if not link.alive:
            return
        log.warning("redis cluster pub/sub connection to %s lost: %s", link.name, why)
        link.abort()
        metrics.BROKER_NODE_UP.labels(link.name).set(0)
        if self._links.get(link.name) is link:
            del self._links[link.name]
        for room_id in link.rooms:
            if self._home.get(room_id) is link:
                del self._home[room_id]
        self._make_stale(link.rooms)
        link.rooms = set()

    def _evict(self, link: Link, rooms: Iterable[str]) -> None:
        """The rooms are no longer subscribed at ``link`` (their slot moved)."""
        for room_id in rooms:
            link.rooms.discard(room_id)
            if self._home.get(room_id) is link:
                del self._home[room_id]
            self._make_stale([room_id])

    # ---- the listener of one link -----------------------------------------------

    async def _listen(self, link: Link) -> None:
        while link.alive:
            try:
                async with asyncio.timeout(self.timeout_s):
                    reply = await link.conn.read_response(timeout=self.ping_interval_s / 2)
                    if reply is not None:
                        link.last_heard = time.monotonic()  # anything heard proves it alive
                        self._on_reply(link, reply)
                    now = time.monotonic()
                    if now - link.last_ping >= self.ping_interval_s:
                        link.last_ping = now
                        await link.conn.send_command("PING", _PING_TOKEN, check_health=False)
            except asyncio.CancelledError:
                raise
            except MovedError as exc:
                # An SSUBSCRIBE reached a node that does not own the slot.
                link.last_heard = time.monotonic()
                moved = [r for r in link.rooms if key_slot(self._chan(r)) == exc.slot_id]
                log.info("slot %d moved to %s:%s", exc.slot_id, exc.host, exc.port)
                self._evict(link, moved)
            except ResponseError as exc:
                link.last_heard = time.monotonic()
                log.warning("redis cluster pub/sub error from %s: %s", link.name, exc)
            except _ERRORS as exc:
                self._lost(link, f"{type(exc).__name__}: {exc}")
                return
            if time.monotonic() - link.last_heard > 3 * self.ping_interval_s:
                self._lost(link, f"no pong for {3 * self.ping_interval_s:g} s")
                return

    def _chan(self, room_id: str) -> bytes:
        return self._keys.channel(room_id).encode()

    def _on_reply(self, link: Link, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # a pong ([b"pong", token] once subscribed, the bare token before)
        kind, channel = reply[0], reply[1]
        if not isinstance(channel, bytes):
            return
        room_id = self._keys.room_of(channel)
        if room_id is None:
            return
        if kind == b"smessage":
            if room_id in self._rooms:
                self._dispatch(room_id, reply[2])
        elif kind == b"ssubscribe":
            waiter = self._confirm.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == b"sunsubscribe":
            if channel in link.leaving:
                link.leaving.discard(channel)
            elif room_id in link.rooms:
                # Pushed by the server: the slot is no longer this master's.
                log.info("%s: %s's slot moved away", link.name, room_id)
                self._evict(link, [room_id])

    # ---- the supervisor: resubscribe stale rooms ----------------------------------

    async def _supervise(self) -> None:
        backoff = _BACKOFF_MIN_S
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.connected and self._stale:
                self.connected = False
                metrics.BROKER_UP.set(0)
            try:
                recovered = await self._resync()
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                log.debug("redis cluster resubscribe failed: %s", exc)
                recovered = []
            if recovered:
                metrics.BROKER_RESUBSCRIBES.inc(len(recovered))
                log.info("redis cluster: %d rooms resubscribed", len(recovered))
                for room_id in recovered:
                    self._dispatch(room_id, None)  # anything may have been lost: catch up
            if self._stale:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                self._kick.set()
                continue
            backoff = _BACKOFF_MIN_S
            if not self.connected:
                self.connected = True
                metrics.BROKER_UP.set(1)
                metrics.BROKER_RECONNECTS.inc()

    async def _resync(self) -> list[str]:
        """Refresh the slot map; subscribe every stale room on its owner; -> rooms confirmed."""
        async with self._lock:
            await self._map.refresh(self._links)
            for room_id, link in list(self._home.items()):
                if self._map.owner(self._chan(room_id)) != link.name:
                    self._evict(link, [room_id])  # our map said otherwise: move it
                    if link.alive:
                        link.leaving.add(self._chan(room_id))
                        await link.send([("SUNSUBSCRIBE", self._chan(room_id))])
            self._stale &= self._rooms
            groups: dict[str, list[str]] = defaultdict(list)
            for room_id in self._stale:
                owner = self._map.owner(self._chan(room_id))
                if owner:
                    groups[owner].append(room_id)
            waiters: dict[str, asyncio.Future[None]] = {}
            loop = asyncio.get_running_loop()
            for owner, rooms in groups.items():
                try:
                    async with asyncio.timeout(self.timeout_s):
                        link = await self._link(owner)
                        for room_id in rooms:
                            # A subscribe() that met MOVED still waits: share its waiter.
                            waiter = self._confirm.get(self._chan(room_id))
                            if waiter is None or waiter.done():
                                waiter = loop.create_future()
                                self._confirm[self._chan(room_id)] = waiter
                            waiters[room_id] = waiter
                        await self._subscribe(link, rooms)
                        metrics.BROKER_NODE_RESUBSCRIBES.labels(owner).inc(len(rooms))
                except _ERRORS as exc:
                    log.debug("resubscribe on %s failed: %s", owner, exc)
            if waiters:
                await asyncio.wait(waiters.values(), timeout=self.timeout_s)
            recovered = []
            for room_id, waiter in waiters.items():
                channel = self._chan(room_id)
                if self._confirm.get(channel) is waiter:
                    del self._confirm[channel]
                if waiter.done() and room_id in self._home and room_id in self._stale:
                    self._stale.discard(room_id)
                    recovered.append(room_id)
            for name, link in list(self._links.items()):
                if not link.rooms and name not in self._map.addrs:
                    link.abort()  # no longer a master
                    if link.task is not None:
                        link.task.cancel()
                    del self._links[name]
            return recovered
