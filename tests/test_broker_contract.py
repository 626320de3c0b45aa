"""One contract suite for every Broker: memory, Redis (shared server, own prefix) and
Redis Cluster (a 3-master cluster of the test session's own, redis+cluster://)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from quartchat import metrics
from quartchat.broker import Broker
from quartchat.broker.memory import MemoryBroker
from quartchat.broker.redis import RedisBroker
from quartchat.broker.redis_cluster import RedisClusterBroker
from quartchat.events import PresenceEvent, decode_events

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


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Any]]:
    brokers: list[Any] = []
    prefix = unique_prefix()
    if request.param == "redis":
        check_shared_redis()
    cluster_url = None
    if request.param == "redis-cluster":
        cluster_url = request.getfixturevalue("redis_cluster").url
    shared_memory = MemoryBroker()

    async def make() -> Broker:
        # Two calls model two server processes sharing the deployment.
        if request.param == "memory":
            if not brokers:
                await shared_memory.start()
            brokers.append(shared_memory)
            return shared_memory
        broker: Any
        if cluster_url is not None:
            broker = RedisClusterBroker(cluster_url, prefix=prefix, server_id=f"node{len(brokers)}")
        else:
            broker = RedisBroker(REDIS_URL, prefix=prefix, server_id=f"node{len(brokers)}")
        await broker.start()
        brokers.append(broker)
        return broker

    yield make
    for b in {id(b): b for b in brokers}.values():
        await b.close()
    if request.param == "redis":
        drop_prefix(prefix)


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


async def test_publish_is_queued_in_call_order_before_it_is_awaited(make_broker: Any) -> None:
    # The room's writer queues its publish, then wakes the actor, then waits:
    # the payload must be on its way from the call, not from the await.
    a, b = await make_broker(), await make_broker()
    inbox = Inbox()
    await b.subscribe("r", inbox)
    first = a.publish("r", b"first")
    second = a.publish("r", b"second")
    await second  # awaited out of call order
    await first
    assert await inbox.wait(2) == [b"first", b"second"]


async def test_two_handlers_on_one_process_share_a_subscription(make_broker: Any) -> None:
    a = await make_broker()
    first, second = Inbox(), Inbox()
    await a.subscribe("r", first)
    await a.subscribe("r", second)
    await a.unsubscribe("r", first)  # the other handler keeps the channel
    await a.publish("r", b"x")
    assert await second.wait(1) == [b"x"]
    await first.stays_at(0)


async def test_the_control_channel_is_a_channel_like_any_room(make_broker: Any) -> None:
    a, b = await make_broker(), await make_broker()
    inbox = Inbox()
    await b.subscribe("@control", inbox)
    await a.publish("@control", b"reload")
    assert await inbox.wait(1) == [b"reload"]


def presence_events(items: list[bytes | None]) -> list[tuple[str, str]]:
    """(event, sender) of every presence event in the payloads, in order."""
    out = []
    for payload in items:
        for event in decode_events(payload or b""):
            if isinstance(event, PresenceEvent):
                out.append((event.event, event.sender_id))
    return out


async def test_presence_announces_first_and_last_anywhere_on_the_room_channel(
    make_broker: Any,
) -> None:
    a, b = await make_broker(), await make_broker()
    watch_a, watch_b = Inbox(), Inbox()
    await a.subscribe("r", watch_a)
    await b.subscribe("r", watch_b)
    a.presence.join("r", "alice")  # never blocks, never raises
    b.presence.join("r", "bob")
    await a.presence.settle()
    await b.presence.settle()
    await watch_a.wait(2)
    await watch_b.wait(2)
    assert sorted(presence_events(watch_b.items)) == [("join", "alice"), ("join", "bob")]
    assert await b.presence.members("r") == ["alice", "bob"]
    assert await a.presence.rooms() == [("r", 2)]
    heard = 2
    if a is not b:
        # alice on a second server process: not first anywhere, not last when one goes.
        b.presence.join("r", "alice")
        await b.presence.settle()
        a.presence.leave("r", "alice")
        await a.presence.settle()
        await watch_a.stays_at(heard)
        assert await b.presence.members("r") == ["alice", "bob"]
        b.presence.leave("r", "alice")
        await b.presence.settle()
    else:
        a.presence.leave("r", "alice")
        await a.presence.settle()
    heard += 1
    await watch_a.wait(heard)
    assert presence_events(watch_a.items)[-1] == ("leave", "alice")
    assert await a.presence.members("r") == ["bob"]
    b.presence.leave("r", "bob")
    await b.presence.settle()
    heard += 1
    await watch_a.wait(heard)
    assert presence_events(watch_a.items)[-1] == ("leave", "bob")
    assert await a.presence.rooms() == []
    assert await a.presence.members("r") == []
    await watch_a.stays_at(heard)


async def test_a_join_and_leave_not_yet_applied_cancel_out(make_broker: Any) -> None:
    a = await make_broker()
    watch = Inbox()
    await a.subscribe("r", watch)
    a.presence.join("r", "flash")
    a.presence.leave("r", "flash")
    await a.presence.settle()
    await watch.stays_at(0)
    assert await a.presence.members("r") == []


async def test_members_lists_each_sender_once_sorted(make_broker: Any) -> None:
    a, b = await make_broker(), await make_broker()
    for sender in ["zed", "amy", "kim"]:
        a.presence.join("room-1", sender)
    b.presence.join("room-1", "amy")
    b.presence.join("room-2", "kim")
    await a.presence.settle()
    await b.presence.settle()
    assert await a.presence.members("room-1") == ["amy", "kim", "zed"]
    assert await b.presence.members("room-1") == ["amy", "kim", "zed"]
    assert await a.presence.rooms() == [("room-1", 3), ("room-2", 1)]


async def test_close_removes_this_process_and_announces_its_leaves() -> None:
    check_shared_redis()
    prefix = unique_prefix()
    a = RedisBroker(REDIS_URL, prefix=prefix, server_id="closes")
    b = RedisBroker(REDIS_URL, prefix=prefix, server_id="stays")
    await a.start()
    await b.start()
    try:
        watch = Inbox()
        await b.subscribe("r", watch)
        a.presence.join("r", "gone")
        b.presence.join("r", "here")
        a.presence.join("r", "both")
        b.presence.join("r", "both")
        await a.presence.settle()
        await b.presence.settle()
        await watch.wait(3)
        await a.close()
        await watch.wait(4)
        assert presence_events(watch.items)[3:] == [("leave", "gone")]
        assert await b.presence.members("r") == ["both", "here"]
    finally:
        await b.close()
        drop_prefix(prefix)


async def test_redis_restart_resubscribes_and_re_adds_presence(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    broker = RedisBroker(server.url, prefix="t", server_id="n", heartbeat_s=0.5)
    try:
        await broker.start()
        inbox = Inbox()
        await broker.subscribe("r", inbox)
        await broker.publish("r", b"before")
        await inbox.wait(1)
        broker.presence.join("r", "alice")
        await broker.presence.settle()
        await inbox.wait(2)  # alice's join

        server.restart()  # comes back empty: channels and presence are gone
        await inbox.wait(3, timeout=15)
        assert inbox.items[2] is None, "a reconnect tells the subscriber to catch up"
        await broker.publish("r", b"after")
        assert (await inbox.wait(4))[3] == b"after"
        await broker.ping()
        probe = redis.asyncio.Redis.from_url(server.url)
        try:
            async with asyncio.timeout(10):
                while not await probe.zcard("{t:r}:m"):
                    await asyncio.sleep(0.1)  # the heartbeat re-adds this process's entries
        finally:
            await probe.aclose()
        assert await broker.presence.members("r") == ["alice"]
        await inbox.stays_at(4)  # re-adding after a restart announces nothing
    finally:
        await broker.close()
        server.kill()


async def test_dead_process_members_are_reaped_with_leave_events_once() -> None:
    """A process that stops heartbeating (killed: no cleanup) loses its members
    within 30 s: one live process announces each leave, exactly once."""
    check_shared_redis()
    prefix = unique_prefix()
    dies = RedisBroker(REDIS_URL, prefix=prefix, server_id="dies")
    lives = [RedisBroker(REDIS_URL, prefix=prefix, server_id=f"lives{i}") for i in range(2)]
    for broker in [dies, *lives]:
        await broker.start()
    try:
        watchers = [Inbox(), Inbox()]
        for broker, watch in zip(lives, watchers):
            await broker.subscribe("r", watch)
        dies.presence.join("r", "ghost")
        dies.presence.join("r", "shared")
        lives[0].presence.join("r", "shared")
        lives[0].presence.join("r", "alive")
        for broker in [dies, *lives]:
            await broker.presence.settle()
        await watchers[0].wait(3)
        await dies.close(remove_presence=False)  # as if killed: its entries stay behind
        died = time.monotonic()
        await watchers[0].wait(4, timeout=30)
        assert time.monotonic() - died < 30
        assert presence_events(watchers[0].items)[3:] == [("leave", "ghost")]
        await watchers[1].wait(4, timeout=2)
        assert await lives[1].presence.members("r") == ["alive", "shared"]
        assert sum(b.presence.reaped for b in lives) == 2, "each entry reaped once"
        await watchers[0].stays_at(4, timeout=1)
    finally:
        for broker in lives:
            await broker.close()
        drop_prefix(prefix)


async def test_cluster_rooms_spread_over_every_master(redis_cluster: Any) -> None:
    """redis+cluster://: each room's channel lives on the master owning its slot; one
    process subscribes through one connection per master, and every master carries some."""
    prefix = unique_prefix()
    a = RedisClusterBroker(redis_cluster.url, prefix=prefix, server_id="pub")
    b = RedisClusterBroker(redis_cluster.url, prefix=prefix, server_id="sub")
    await a.start()
    await b.start()
    try:
        rooms = [f"room-{i}" for i in range(30)]
        inboxes = {room: Inbox() for room in rooms}
        for room in rooms:
            await b.subscribe(room, inboxes[room])
        carried = b.masters()
        assert len(carried) == 3 and sum(carried.values()) == 30, carried
        assert all(n > 0 for n in carried.values()), carried
        for node in carried:  # one connection per master, up
            up = metrics.REGISTRY.get_sample_value("quartchat_broker_node_up", {"node": node})
            assert up == 1, node
        # The cluster's own view: each master lists the shard channels it carries.
        for port in redis_cluster.masters():
            client = redis_cluster.client(port)
            listed = client.execute_command("PUBSUB SHARDCHANNELS", f"{{{prefix}:*")
            client.close()
            assert len(listed) == carried[f"127.0.0.1:{port}"], (port, listed)
        for room in rooms:
            await a.publish(room, room.encode())
        for room in rooms:
            assert await inboxes[room].wait(1) == [room.encode()]
        await b.unsubscribe("room-0", inboxes["room-0"])
        assert sum(b.masters().values()) == 29
    finally:
        await a.close()
        await b.close()
