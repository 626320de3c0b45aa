"""Cluster-wide presence in Redis that heals itself (keys and scripts: redis_scripts.py).

This process keeps its local table: what rooms told it through ``join`` and
``leave`` (``_desired``) and what it knows Redis holds (``_applied``). Rooms
never wait: a change marks the (room, sender) pair dirty, and one worker task
applies dirty pairs in pipelined batches (one Lua call per change), retrying
with capped backoff until applied. The scripts publish the presence event on
the room's channel themselves, atomically with the change.

Liveness is the heartbeat: every ``heartbeat_s`` this process extends the
expiry of each of its entries to Redis ``TIME`` + ``dead_after_s``, re-adding
any entry Redis lost (a restart empty). An entry whose node stopped
heartbeating expires; a process that has the room subscribed finds it in its
own heartbeat and removes it with one script that also announces the leave,
so exactly one process announces.

No process reaps a live one after an outage: a process reaps only once it
has itself heartbeated without a failure or a stall for a full dead window,
and every process refreshes all its entries as soon as Redis answers again.
A reap command that was delayed in a frozen Redis refuses to run (it
carries the Redis time it was computed at).
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
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from . import BrokerError, presence_payload
from . import redis_scripts as lua

__all__ = ["RedisPresence"]

log = logging.getLogger(__name__)

_BATCH = 500  # changes (or rooms) per pipeline
_STALE_MS = 5000  # a change computed longer ago than this is refused and retried
_REAP_STALE_MS = 2000
_REAP_LIMIT = 200  # expired entries read per room and heartbeat
_SETTLE_DOWN_S = 2.0
_SETTLE_MAX_S = 30.0
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 2.0

Key = tuple[str, str]  # (room_id, sender_id)


def _errors() -> tuple[type[BaseException], ...]:
    return (RedisError, RedisClusterException, OSError, BrokerError, TimeoutError)


class _Script:
    """A registered script. On a cluster, queued in a pipeline as a plain EVALSHA:
    redis-py refuses script calls on a ClusterPipeline (RedisClusterException)."""

    def __init__(self, script: AsyncScript, sharded: bool) -> None:
        self.script = script
        self.sharded = sharded

    async def __call__(self, keys: list[str], args: Iterable[Any] = (), client: Any = None) -> Any:
        if self.sharded and client is not None:
            client.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
            return None
        return await self.script(keys=keys, args=list(args), client=client)


class RedisPresence:
    """This process's presence entries in Redis, applied, refreshed and reaped in the background."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        keys: lua.Keys,
        node: str,
        *,
        subscribed: Callable[[], Iterable[str]],
        publish: Callable[[str, bytes], Awaitable[None]],
        heartbeat_s: float = 5.0,
        dead_after_s: float = 20.0,
        sharded: bool = False,
    ) -> None:
        # Any: redis-py types a script's client= as Redis | RedisCluster, and a
        # ClusterPipeline is neither (it works: scripts queue as EVALSHA).
        self._r: Any = client
        # On a cluster the scripts SPUBLISH, and a pipeline does not load them by
        # itself: a master that never saw them (new, promoted, restarted) answers
        # NOSCRIPT, and _loaded() loads them on every master before the retry.
        self._sharded = sharded
        self._keys = keys
        self.node = node
        self._node_head = node.encode() + b"\0"
        self._subscribed = subscribed
        self._publish = publish
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self._window_ms = int(dead_after_s * 1000)
        scripts = {
            name: _Script(
                client.register_script(
                    lua.sharded(getattr(lua, name)) if sharded else getattr(lua, name)
                ),
                sharded,
            )
            for name in (
                "JOIN",
                "LEAVE",
                "REFRESH",
                "EXPIRED",
                "REAP",
                "MEMBERS",
                "TOUCH_ROOMS",
                "LIVE_ROOMS",
            )
        }
        self._lua = scripts
        self._desired: dict[str, set[str]] = {}
        self._applied: set[Key] = set()
        self._dirty: dict[Key, int] = {}  # pair -> generation of its latest change
        self._gen = 0
        self._wake = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._progress = asyncio.Event()
        self._reannounce: set[Key] = set()
        self.down = False
        self._offset_ms: float | None = None  # Redis ms minus local monotonic ms
        self._healthy_since: float | None = None
        self._last_beat: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0  # entries this process removed (tests, logs)

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
        self._healthy_since = None
        self._beat_now.set()

    def _mark(self, key: Key) -> None:
        self._gen += 1
        self._dirty[key] = self._gen
        self._wake.set()

    async def members(self, room_id: str) -> list[str]:
        try:
            live = await self._lua["MEMBERS"](keys=[self._keys.presence(room_id)[0]])
        except _errors() as exc:
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
            for chunk in _chunks(names, _BATCH):
                async with self._r.pipeline(transaction=False) as pipe:
                    for room_id in chunk:
                        await self._lua["MEMBERS"](
                            keys=[self._keys.presence(room_id)[0]], client=pipe
                        )
                    results = await pipe.execute(raise_on_error=False)
                await self._loaded(results)
                for res in results:
                    if isinstance(res, Exception):
                        raise res
                counts += [len(self._merge(r, res[1:])) for r, res in zip(chunk, results)]
        except _errors() as exc:
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

    async def _loaded(self, results: Iterable[Any]) -> None:
        """Load every script on every master if a pipeline met NOSCRIPT (cluster only:
        a plain Redis pipeline loads its scripts itself)."""
        if any(isinstance(r, NoScriptError) for r in results):
            for script in self._lua.values():
                await self._r.script_load(script.script.script)

    async def start(self) -> None:
        if self._sharded:
            await self._loaded([NoScriptError()])
        await self._beat()
        self._last_beat = self._healthy_since = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._work(), name="presence-worker"),
            asyncio.create_task(self._beat_loop(), name="presence-heartbeat"),
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
                for chunk in _chunks(ops, _BATCH):
                    await self._apply(chunk)
        except _errors() as exc:
            log.warning("presence entries not removed at close (they expire): %s", exc)

    # ---- the worker: apply changes in batches ------------------------------

    async def _work(self) -> None:
        backoff = _BACKOFF_MIN_S
        while True:
            if not self._dirty:
                self._wake.clear()
                await self._wake.wait()
            ops: list[tuple[Key, int, bool]] = []
            for key, gen in list(islice(self._dirty.items(), _BATCH)):
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
                except _errors() as exc:
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
        now = self._redis_now()
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
                            _STALE_MS,
                            self.node,
                            sender,
                            self._window_ms,
                            presence_payload(room_id, sender, "join"),
                        ],
                    )
                else:
                    await self._lua["LEAVE"](
                        keys=keys,
                        client=pipe,
                        args=[
                            now,
                            _STALE_MS,
                            self.node,
                            sender,
                            presence_payload(room_id, sender, "leave"),
                        ],
                    )
            if joined:
                await self._lua["TOUCH_ROOMS"](
                    keys=[self._keys.rooms], client=pipe, args=[self._window_ms, *sorted(joined)]
                )
            results = await pipe.execute(raise_on_error=False)
        await self._loaded(results)
        return list(results[: len(ops)])

    def _redis_now(self) -> int:
        if self._offset_ms is None:
            raise BrokerError("redis time unknown (no heartbeat yet)")
        return int(time.monotonic() * 1000 + self._offset_ms)

    # ---- heartbeat and reaper ---------------------------------------------

    async def _beat_loop(self) -> None:
        backoff = _BACKOFF_MIN_S * 5
        while True:
            try:  # start() has just beaten once
                async with asyncio.timeout(self.heartbeat_s * (0.8 + 0.4 * random.random())):
                    await self._beat_now.wait()
            except TimeoutError:
                pass
            self._beat_now.clear()
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except _errors() as exc:
                if self._healthy_since is not None:
                    log.warning("presence heartbeat failed: %s", exc)
                self._healthy_since = None
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                self._beat_now.set()  # retry at once after the backoff
                continue
            backoff = _BACKOFF_MIN_S * 5
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
                    await self._reap()
                except asyncio.CancelledError:
                    raise
                except _errors() as exc:
                    log.warning("presence reap failed: %s", exc)

    async def _beat(self) -> None:
        """Learn Redis time; extend (or re-add) every entry of this node; re-announce."""
        before = time.monotonic()
        sec, usec = await self._r.time()
        after = time.monotonic()
        self._offset_ms = sec * 1000 + usec / 1000 - (before + after) * 500
        mine: dict[str, list[str]] = {}
        for room_id, sender in self._applied:
            if sender in self._desired.get(room_id, ()):
                mine.setdefault(room_id, []).append(sender)
        for chunk in _chunks(sorted(mine), _BATCH):
            now = self._redis_now()
            async with self._r.pipeline(transaction=False) as pipe:
                for room_id in chunk:
                    await self._lua["REFRESH"](
                        keys=self._keys.presence(room_id)[:3],
                        client=pipe,
                        args=[now, _STALE_MS, self.node, self._window_ms, *mine[room_id]],
                    )
                await self._lua["TOUCH_ROOMS"](
                    keys=[self._keys.rooms], client=pipe, args=[self._window_ms, *chunk]
                )
                results = await pipe.execute(raise_on_error=False)
            await self._loaded(results)
            for room_id, result in zip(chunk, results):
                if isinstance(result, Exception):
                    raise result
                if result == -1:
                    raise BrokerError("heartbeat refused as stale")
                self._reannounce.update((room_id, s.decode()) for s in result)
        for room_id, sender in sorted(self._reannounce):
            # Re-added after a reaper announced our member's leave: announce the join.
            await self._publish(room_id, presence_payload(room_id, sender, "join"))
            self._reannounce.discard((room_id, sender))

    async def _reap(self) -> None:
        """Remove other nodes' expired entries in the rooms this process subscribes to."""
        rooms = sorted(r for r in self._subscribed() if not r.startswith("@"))
        for chunk in _chunks(rooms, _BATCH):
            async with self._r.pipeline(transaction=False) as pipe:
                for room_id in chunk:
                    await self._lua["EXPIRED"](
                        keys=[self._keys.presence(room_id)[0]], args=[_REAP_LIMIT], client=pipe
                    )
                found = await pipe.execute(raise_on_error=False)
            await self._loaded(found)
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
                        args += [entry, presence_payload(room_id, sender, "leave")]
                    await self._lua["REAP"](
                        keys=self._keys.presence(room_id), args=args, client=pipe
                    )
                results = await pipe.execute(raise_on_error=False)
            await self._loaded(results)
            for (room_id, _now, _entries), result in zip(todo, results):
                if isinstance(result, int) and result > 0:
                    self.reaped += result
                    log.info(
                        "reaped %d presence entries of dead server processes",
                        result,
                        extra={"room_id": room_id},
                    )


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
