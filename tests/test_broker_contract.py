"""One contract suite for every Broker: memory and Redis (shared server, own prefix)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from quartchat.broker import Broker
from quartchat.broker.memory import MemoryBroker
from quartchat.broker.redis import RedisBroker

from .redis_util import REDIS_URL, RedisServer, check_shared_redis, drop_prefix, unique_prefix


class Inbox:
    """A handler that records payloads."""

    def __init__(self) -> None:
        self.items: list[bytes | None] = []
        self.event = asyncio.Event()

    def __call__(self, payload: bytes | None) -> None:
        self.items.append(payload)
        self.event.set()

    async def wait(self, n: int, timeout: float = 5.0) -> list[bytes | None]:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self.event.clear()
                await self.event.wait()
        return self.items

    async def stays_at(self, n: int, timeout: float = 0.2) -> None:
        await asyncio.sleep(timeout)
        assert len(self.items) == n, self.items


@pytest.fixture(params=["memory", "redis"])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Any]]:
    brokers: list[Any] = []
    prefix = unique_prefix()
    if request.param == "redis":
        check_shared_redis()
    shared_memory = MemoryBroker()

    async def make() -> Broker:
        # Two calls model two server processes sharing the deployment.
        if request.param == "memory":
            if not brokers:
                await shared_memory.start()
            brokers.append(shared_memory)
            return shared_memory
        broker = RedisBroker(REDIS_URL, prefix=prefix, server_id=f"node{len(brokers)}")
        await broker.start()
        brokers.append(broker)
        return broker

    yield make
    for b in {id(b): b for b in brokers}.values():
        await b.close()
    if request.param == "redis":
        drop_prefix(prefix)


async def floor_of(value: int) -> Callable[[], Any]:
    async def floor() -> int:
        return value

    return floor


async def test_publish_reaches_subscribers_of_that_room_only(make_broker: Any) -> None:
    a, b = await make_broker(), await make_broker()
    one, two, other = Inbox(), Inbox(), Inbox()
    await a.subscribe("r1", one)
    await b.subscribe("r1", two)
    await b.subscribe("r2", other)
    await a.publish("r1", b"hello")
    await b.publish("r1", b"world")
    assert await one.wait(2) == [b"hello", b"world"]
    assert await two.wait(2) == [b"hello", b"world"]
    await other.stays_at(0)
    await b.unsubscribe("r1", two)
    await a.publish("r1", b"again")
    await one.wait(3)
    await two.stays_at(2)


async def test_two_handlers_on_one_process_share_a_subscription(make_broker: Any) -> None:
    a = await make_broker()
    first, second = Inbox(), Inbox()
    await a.subscribe("r", first)
    await a.subscribe("r", second)
    await a.unsubscribe("r", first)  # the other handler keeps the channel
    await a.publish("r", b"x")
    assert await second.wait(1) == [b"x"]
    await first.stays_at(0)


async def test_sequencer_is_shared_consecutive_and_seeded_from_the_store(make_broker: Any) -> None:
    a, b = await make_broker(), await make_broker()
    floor = await floor_of(41)
    last = await a.next_seqs("room", 1, floor)
    assert last == 42, "a counter that did not exist starts above the store's max"
    assert await b.next_seqs("room", 5, floor) == 47
    assert await a.next_seqs("room", 1, floor) == 48
    assert await a.next_seqs("fresh", 3, await floor_of(0)) == 3
    # Re-seeding never lowers the counter, and raises it to the store's max.
    await a.reseed("room", await floor_of(10))
    assert await a.next_seqs("room", 1, floor) == 49
    await b.reseed("room", await floor_of(100))
    assert await a.next_seqs("room", 1, floor) == 101


async def test_presence_counts_first_and_last_across_processes(make_broker: Any) -> None:
    a, b = await make_broker(), await make_broker()
    assert await a.presence.add("r", "alice") is True
    assert await b.presence.add("r", "bob") is True
    assert await b.presence.members("r") == ["alice", "bob"]
    assert await a.presence.rooms() == [("r", 2)]
    if a is not b:
        # alice on a second server process: not "first" any more.
        assert await b.presence.add("r", "alice") is False
        assert await a.presence.remove("r", "alice") is False
        assert await b.presence.remove("r", "alice") is True
    else:
        assert await a.presence.remove("r", "alice") is True
    assert await a.presence.remove("r", "alice") is False, "removing twice is a no-op"
    assert await a.presence.members("r") == ["bob"]
    assert await b.presence.remove("r", "bob") is True
    assert await a.presence.rooms() == []


async def test_redis_restart_resubscribes_and_never_reuses_a_seq(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    broker = RedisBroker(server.url, prefix="t", server_id="n")
    try:
        await broker.start()
        inbox = Inbox()
        await broker.subscribe("r", inbox)
        stored = 0

        async def floor() -> int:
            return stored

        await broker.publish("r", b"before")
        await inbox.wait(1)
        stored = await broker.next_seqs("r", 10, floor)
        assert stored == 10

        server.restart()  # comes back empty: channels and the counter are gone
        await inbox.wait(2, timeout=15)
        assert inbox.items[1] is None, "a reconnect tells the subscriber to catch up"
        await broker.publish("r", b"after")
        assert (await inbox.wait(3))[2] == b"after"
        assert await broker.next_seqs("r", 1, floor) == 11, "seqs never go backwards"
        await broker.ping()
    finally:
        await broker.close()
        server.kill()


async def test_dead_process_members_are_reaped_with_leave_events() -> None:
    check_shared_redis()
    prefix = unique_prefix()
    a = RedisBroker(REDIS_URL, prefix=prefix, server_id="dies")
    b = RedisBroker(REDIS_URL, prefix=prefix, server_id="lives")
    await a.start()
    await b.start()
    try:
        watcher = Inbox()
        await b.subscribe("r", watcher)
        await a.presence.add("r", "ghost")
        await b.presence.add("r", "alive")
        # a's process dies: its heartbeat stops (we age it past the deadline).
        await a._r.zadd(f"{prefix}:nodes", {a.node: 0})
        assert await b.presence.reap(b.publish) == 1
        payload = (await watcher.wait(1))[0]
        assert payload is not None and b'"event":"leave"' in payload and b"ghost" in payload
        assert await b.presence.members("r") == ["alive"]
        assert await b.presence.reap(b.publish) == 0, "reaped once"
    finally:
        await a.close()
        await b.close()
        drop_prefix(prefix)


async def test_first_posts_to_a_new_room_from_many_processes_leave_no_gap(make_broker: Any) -> None:
    """Regression: a process that found the counter missing used to take seq 1,
    then re-seed above seqs the others had meanwhile stored, abandoning seq 1
    (every server then waited for it until the skip timeout)."""
    brokers = [await make_broker() for _ in range(3)]
    committed: set[int] = set()

    async def floor() -> int:
        await asyncio.sleep(0.05)  # a slow store read, while others go on
        return max(committed, default=0)

    async def take(broker: Any) -> int:
        seq = await broker.next_seqs("brand-new", 1, floor)
        committed.add(seq)
        return seq

    seqs = await asyncio.gather(*(take(b) for b in brokers for _ in range(4)))
    assert sorted(seqs) == list(range(1, 13))
