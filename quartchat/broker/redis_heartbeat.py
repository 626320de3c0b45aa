"""The liveness of presence in Redis: this process's heartbeat, and the reaper of dead ones.

Every ``heartbeat_s`` (jittered) this process learns Redis ``TIME`` and
extends the expiry of each of its entries to Redis time + ``dead_after_s``,
re-adding any entry Redis lost (a restart empty). An entry re-added after a
reaper announced its leave is announced again (a join). The Redis time
learnt here is also what every change the presence worker sends carries
(:meth:`Heartbeat.redis_now`).

An entry whose node stopped heartbeating expires; a process that has the
room subscribed finds it in its own heartbeat and removes it with one script
that also announces the leave, so exactly one process announces.

No process reaps a live one after an outage: a process reaps only once it
has itself heartbeated without a failure or a stall for a full dead window,
and every process refreshes all its entries as soon as Redis answers again
(:meth:`Heartbeat.reconnected`). A reap command that was delayed in a frozen
Redis refuses to run (it carries the Redis time it was computed at).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..events import PresenceEvent, encode_events
from . import BrokerError
from .redis_scripts import BATCH, ERRORS, STALE_MS, Keys, Scripts, chunks

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)

_REAP_STALE_MS = 2000
_REAP_LIMIT = 200  # expired entries read per room and heartbeat
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 2.0


class Heartbeat:
    """Keeps this node's presence entries alive in Redis; reaps other nodes' expired ones."""

    def __init__(
        self,
        client: Any,
        scripts: Scripts,
        keys: Keys,
        node: str,
        *,
        entries: Callable[[], dict[str, list[str]]],
        subscribed: Callable[[], Iterable[str]],
        publish: Callable[[str, bytes], Awaitable[None]],
        heartbeat_s: float,
        dead_after_s: float,
    ) -> None:
        self._r = client
        self._lua = scripts
        self._keys = keys
        self.node = node
        self._node_head = node.encode() + b"\0"
        self._entries = entries
        self._subscribed = subscribed
        self._publish = publish
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self._window_ms = int(dead_after_s * 1000)
        self._beat_now = asyncio.Event()
        self._reannounce: set[tuple[str, str]] = set()
        self._offset_ms: float | None = None  # Redis ms minus local monotonic ms
        self._healthy_since: float | None = None
        self._last_beat: float | None = None
        self.reaped = 0  # entries this process removed (tests, logs)

    def redis_now(self) -> int:
        """This process's estimate of Redis time (ms), from the last heartbeat."""
        if self._offset_ms is None:
            raise BrokerError("redis time unknown (no heartbeat yet)")
        return int(time.monotonic() * 1000 + self._offset_ms)

    def reconnected(self) -> None:
        """Redis is back: heartbeat now, and reap again only after a full dead window."""
        self._healthy_since = None
        self._beat_now.set()

    async def start(self) -> None:
        """The first heartbeat (it raises if Redis does not answer)."""
        await self.beat()
        self._last_beat = self._healthy_since = time.monotonic()

    async def run(self) -> None:
        """Heartbeat until cancelled; reap once healthy for a dead window."""
        backoff = _BACKOFF_MIN_S
        while True:
            try:  # start() has just beaten once
                async with asyncio.timeout(self.heartbeat_s * (0.8 + 0.4 * random.random())):
                    await self._beat_now.wait()
            except TimeoutError:
                pass
            self._beat_now.clear()
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except ERRORS as exc:
                if self._healthy_since is not None:
                    log.warning("presence heartbeat failed: %s", exc)
                self._healthy_since = None
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                self._beat_now.set()  # retry at once after the backoff
                continue
            backoff = _BACKOFF_MIN_S
            now = time.monotonic()
            if self._last_beat is not None and now - self._last_beat > 2 * self.heartbeat_s:
                self._healthy_since = None  # this process stalled: its view is not fresh
            if self._healthy_since is None:
                self._healthy_since = now
                log.info(
                    "presence heartbeat healthy again; reaping resumes in %.0f s", self.dead_after_s
                )
            self._last_beat = now
            if now - self._healthy_since >= self.dead_after_s:
                try:
                    await self.reap()
                except asyncio.CancelledError:
                    raise
                except ERRORS as exc:
                    log.warning("presence reap failed: %s", exc)

    async def beat(self) -> None:
        """Learn Redis time; extend (or re-add) every entry of this node; re-announce."""
        before = time.monotonic()
        sec, usec = await self._r.time()
        after = time.monotonic()
        self._offset_ms = sec * 1000 + usec / 1000 - (before + after) * 500
        mine = self._entries()
        for chunk in chunks(sorted(mine), BATCH):
            now = self.redis_now()
            async with self._r.pipeline(transaction=False) as pipe:
                for room_id in chunk:
                    await self._lua["REFRESH"](
                        keys=self._keys.presence(room_id)[:3],
                        client=pipe,
                        args=[now, STALE_MS, self.node, self._window_ms, *mine[room_id]],
                    )
                await self._lua["TOUCH_ROOMS"](
                    keys=[self._keys.rooms], client=pipe, args=[self._window_ms, *chunk]
                )
                results = await pipe.execute(raise_on_error=False)
            await self._lua.loaded(results)
            for room_id, result in zip(chunk, results):
                if isinstance(result, Exception):
                    raise result
                if result == -1:
                    raise BrokerError("heartbeat refused as stale")
                self._reannounce.update((room_id, s.decode()) for s in result)
        for room_id, sender in sorted(self._reannounce):
            # Re-added after a reaper announced our member's leave: announce the join.
            await self._publish(room_id, encode_events([PresenceEvent(sender, "join")]))
            self._reannounce.discard((room_id, sender))

    async def reap(self) -> None:
        """Remove other nodes' expired entries in the rooms this process subscribes to."""
        rooms = sorted(r for r in self._subscribed() if not r.startswith("@"))
        for chunk in chunks(rooms, BATCH):
            async with self._r.pipeline(transaction=False) as pipe:
                for room_id in chunk:
                    await self._lua["EXPIRED"](
                        keys=[self._keys.presence(room_id)[0]], args=[_REAP_LIMIT], client=pipe
                    )
                found = await pipe.execute(raise_on_error=False)
            await self._lua.loaded(found)
            for res in found:
                if isinstance(res, Exception):
                    raise res
            todo = []
            for room_id, res in zip(chunk, found):
                entries = [e for e in res[1:] if not e.startswith(self._node_head)]
                if entries:
                    todo.append((room_id, int(res[0]), entries))
            if not todo:
                continue
            async with self._r.pipeline(transaction=False) as pipe:
                for room_id, now, entries in todo:
                    args: list[Any] = [now, _REAP_STALE_MS]
                    for entry in entries:
                        sender = entry.partition(b"\0")[2].decode()
                        args += [entry, encode_events([PresenceEvent(sender, "leave")])]
                    await self._lua["REAP"](
                        keys=self._keys.presence(room_id), args=args, client=pipe
                    )
                results = await pipe.execute(raise_on_error=False)
            await self._lua.loaded(results)
            for (room_id, _now, _entries), result in zip(todo, results):
                if isinstance(result, int) and result > 0:
                    self.reaped += result
                    log.info(
                        "reaped %d presence entries of dead server processes",
                        result,
                        extra={"room_id": room_id},
                    )
