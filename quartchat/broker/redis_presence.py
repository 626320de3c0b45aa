"""Cluster-wide presence in Redis that heals itself: the local table, and the worker applying it.

This process keeps its local table: what rooms told it through ``join`` and
``leave`` (``_desired``) and what it knows Redis holds (``_applied``). Rooms
never wait: a change marks the (room, sender) pair dirty, and one worker task
applies dirty pairs in pipelined batches (one Lua call per change), retrying
with capped backoff until applied. The scripts publish the presence event on
the room's channel themselves, atomically with the change. Reads
(``members``, ``rooms``) merge other nodes' live entries in Redis with this
node's own table.

Liveness (the heartbeat that keeps this node's entries alive in Redis, and
the reaper of dead nodes' entries) is redis_heartbeat.py's; the keys and the
scripts are redis_scripts.py's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice
from typing import Any

import redis.asyncio as aioredis

from ..events import PresenceEvent, encode_events
from . import BrokerError
from .redis_heartbeat import Heartbeat
from .redis_scripts import BATCH, ERRORS, STALE_MS, Keys, Scripts, chunks

__all__ = ["RedisPresence"]

log = logging.getLogger(__name__)

_SETTLE_DOWN_S = 2.0
_SETTLE_MAX_S = 30.0
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 2.0

Key = tuple[str, str]  # (room_id, sender_id)


class RedisPresence:
    """This process's presence entries in Redis, applied, refreshed and reaped in the background."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        keys: Keys,
        node: str,
        *,
        subscribed: Callable[[], Iterable[str]],
        publish: Callable[[str, bytes], Awaitable[None]],
        heartbeat_s: float = 5.0,
        dead_after_s: float = 20.0,
        sharded: bool = False,
    ) -> None:
        # Any: a script's client= may be a pipeline, which redis-py's types refuse
        # (see Scripts).
        self._r: Any = client
        # On a cluster the scripts SPUBLISH, and a pipeline does not load them by
        # itself: a master that never saw them (new, promoted, restarted) answers
        # NOSCRIPT, and Scripts.loaded() loads them on every master before the retry.
        self._sharded = sharded
        self._keys = keys
        self.node = node
        self._node_head = node.encode() + b"\0"
        self._window_ms = int(dead_after_s * 1000)
        self._lua = Scripts(client, cluster=sharded)
        self._desired: dict[str, set[str]] = {}
        self._applied: set[Key] = set()
        self._dirty: dict[Key, int] = {}  # pair -> generation of its latest change
        self._gen = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self.down = False
        self._tasks: list[asyncio.Task[None]] = []
        self.heartbeat = Heartbeat(
            self._r,
            self._lua,
            keys,
            node,
            entries=self._entries,
            subscribed=subscribed,
            publish=publish,
            heartbeat_s=heartbeat_s,
            dead_after_s=dead_after_s,
        )

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat.heartbeat_s

    @property
    def dead_after_s(self) -> float:
        return self.heartbeat.dead_after_s

    @property
    def reaped(self) -> int:
        """Entries this process removed (tests, logs)."""
        return self.heartbeat.reaped

    # ---- what rooms call --------------------------------------------------

    def join(self, room_id: str, sender_id: str) -> None:
        self._desired.setdefault(room_id, set()).add(sender_id)
        self._mark((room_id, sender_id))

    def leave(self, room_id: str, sender_id: str) -> None:
        senders = self._desired.get(room_id)
        if senders is not None:
            senders.discard(sender_id)
            if not senders:
                del self._desired[room_id]
        self._mark((room_id, sender_id))

    def reconnected(self) -> None:
        """The broker lost Redis and is back: heartbeat now (Redis may have restarted
        empty), and reap again only after a full dead window from here."""
        self.heartbeat.reconnected()

    def _mark(self, key: Key) -> None:
        self._gen += 1
        self._dirty[key] = self._gen
        self._wake.set()

    async def members(self, room_id: str) -> list[str]:
        try:
            live = await self._lua["MEMBERS"](keys=[self._keys.presence(room_id)[0]])
        except ERRORS as exc:
            raise BrokerError(f"redis: {type(exc).__name__}: {exc}") from exc
        return sorted(self._merge(room_id, live[1:]))

    def _merge(self, room_id: str, entries: list[bytes]) -> set[str]:
        """Other nodes' live senders from Redis, plus this node's own local table."""
        others = {
            e.partition(b"\0")[2].decode() for e in entries if not e.startswith(self._node_head)
        }
        return others | self._desired.get(room_id, set())

    async def rooms(self) -> list[tuple[str, int]]:
        try:
            listed = await self._lua["LIVE_ROOMS"](keys=[self._keys.rooms])
            names = sorted({r.decode() for r in listed[1:]} | set(self._desired))
            counts: list[int] = []
            for chunk in chunks(names, BATCH):
                async with self._r.pipeline(transaction=False) as pipe:
                    for room_id in chunk:
                        await self._lua["MEMBERS"](
                            keys=[self._keys.presence(room_id)[0]], client=pipe
                        )
                    results = await pipe.execute(raise_on_error=False)
                await self._lua.loaded(results)
                for res in results:
                    if isinstance(res, Exception):
                        raise res
                counts += [len(self._merge(r, res[1:])) for r, res in zip(chunk, results)]
        except ERRORS as exc:
            raise BrokerError(f"redis: {type(exc).__name__}: {exc}") from exc
        return [(room, n) for room, n in zip(names, counts) if n > 0]

    async def settle(self) -> None:
        target = self._gen
        started = time.monotonic()
        while any(gen <= target for gen in self._dirty.values()):
            waited = time.monotonic() - started
            if (self.down and waited >= _SETTLE_DOWN_S) or waited >= _SETTLE_MAX_S:
                return
            self._progress.clear()
            try:
                async with asyncio.timeout(0.25):
                    await self._progress.wait()
            except TimeoutError:
                pass

    # ---- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        if self._sharded:
            await self._lua.load()
        await self.heartbeat.start()
        self._tasks = [
            asyncio.create_task(self._work(), name="presence-worker"),
            asyncio.create_task(self.heartbeat.run(), name="presence-heartbeat"),
        ]

    async def close(self, *, remove: bool = True) -> None:
        """Settle (bounded), stop, then remove this node's entries (announcing leaves)."""
        if remove:
            try:
                async with asyncio.timeout(_SETTLE_DOWN_S + 1):
                    await self.settle()
            except TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if not remove or not self._applied:
            return
        ops = [(key, 0, False) for key in sorted(self._applied)]
        try:
            async with asyncio.timeout(5):
                for chunk in chunks(ops, BATCH):
                    await self._apply(chunk)
        except ERRORS as exc:
            log.warning("presence entries not removed at close (they expire): %s", exc)

    # ---- the worker: apply changes in batches ------------------------------

    async def _work(self) -> None:
        backoff = _BACKOFF_MIN_S
        while True:
            if not self._dirty:
                self._wake.clear()
                await self._wake.wait()
            ops: list[tuple[Key, int, bool]] = []
            for key, gen in list(islice(self._dirty.items(), BATCH)):
                want = key[1] in self._desired.get(key[0], ())
                if want == (key in self._applied):
                    del self._dirty[key]  # nothing to do (a join and a leave cancelled out)
                else:
                    ops.append((key, gen, want))
            failed = False
            if ops:
                try:
                    results = await self._apply(ops)
                except asyncio.CancelledError:
                    raise
                except ERRORS as exc:
                    if not self.down:
                        log.warning("presence changes not applied (retrying): %s", exc)
                    self.down = failed = True
                    results = []
                else:
                    self.down = False
                for (key, gen, want), result in zip(ops, results):
                    if isinstance(result, Exception) or result == -1:
                        failed = True  # refused as stale or failed: retried next round
                        continue
                    if want:
                        self._applied.add(key)
                    else:
                        self._applied.discard(key)
                    if self._dirty.get(key) == gen:
                        del self._dirty[key]
            self._progress.set()
            if failed:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            else:
                backoff = _BACKOFF_MIN_S

    async def _apply(self, ops: list[tuple[Key, int, bool]]) -> list[Any]:
        """One pipeline: a JOIN or LEAVE script call per change. -> results, in order."""
        now = self.heartbeat.redis_now()
        joined: set[str] = set()
        async with self._r.pipeline(transaction=False) as pipe:
            for (room_id, sender), _gen, want in ops:
                keys = self._keys.presence(room_id)
                if want:
                    joined.add(room_id)
                    await self._lua["JOIN"](
                        keys=keys,
                        client=pipe,
                        args=[
                            now,
                            STALE_MS,
                            self.node,
                            sender,
                            self._window_ms,
                            encode_events([PresenceEvent(sender, "join")]),
                        ],
                    )
                else:
                    await self._lua["LEAVE"](
                        keys=keys,
                        client=pipe,
                        args=[
                            now,
                            STALE_MS,
                            self.node,
                            sender,
                            encode_events([PresenceEvent(sender, "leave")]),
                        ],
                    )
            if joined:
                await self._lua["TOUCH_ROOMS"](
                    keys=[self._keys.rooms], client=pipe, args=[self._window_ms, *sorted(joined)]
                )
            results = await pipe.execute(raise_on_error=False)
        await self._lua.loaded(results)
        return list(results[: len(ops)])

    def _entries(self) -> dict[str, list[str]]:
        """What the heartbeat refreshes: room -> this node's senders applied and still wanted."""
        mine: dict[str, list[str]] = {}
        for room_id, sender in self._applied:
            if sender in self._desired.get(room_id, ()):
                mine.setdefault(room_id, []).append(sender)
        return mine
