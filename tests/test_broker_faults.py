"""Regression tests of the Redis broker under bursts and faults (issue 8: findings 6, 8, 9).

Each failed on 5fa4684 (the broker before presence was queued): see the
broker note. The API calls are in small helpers at the top so the same
scenarios could be driven through that older API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from quartchat.broker import BrokerError
from quartchat.broker import redis as redis_broker
from quartchat.broker.redis import RedisBroker
from quartchat.broker.redis_pubsub import drain

from .redis_util import REDIS_URL, RedisServer, check_shared_redis, drop_prefix, unique_prefix
from .test_broker_contract import Inbox, presence_events


def join(broker: RedisBroker, room_id: str, sender: str) -> None:
    broker.presence.join(room_id, sender)


def leave(broker: RedisBroker, room_id: str, sender: str) -> None:
    broker.presence.leave(room_id, sender)


async def settle(broker: RedisBroker) -> None:
    await broker.presence.settle()


def broker_for(url: str, prefix: str, server_id: str, **options: Any) -> RedisBroker:
    return RedisBroker(url, prefix=prefix, server_id=server_id, **options)


async def until(predicate: Any, timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; -> seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout:g} s") from None
    return time.monotonic() - started


async def test_a_burst_of_publishes_and_presence_changes_all_succeed() -> None:
    """Finding 9: 1,000 concurrent publishes and 2,000 concurrent presence changes
    used to exhaust redis-py 8's capped pool (MaxConnectionsError)."""
    check_shared_redis()
    prefix = unique_prefix()
    rooms = [f"room-{i}" for i in range(1000)]
    sender = broker_for(REDIS_URL, prefix, "sender")
    receiver = broker_for(REDIS_URL, prefix, "receiver")
    await sender.start()
    await receiver.start()
    try:
        inbox = Inbox()
        for room_id in rooms:
            await receiver.subscribe(room_id, inbox)
        results = await asyncio.gather(
            *(sender.publish(r, f"p-{r}".encode()) for r in rooms), return_exceptions=True
        )
        failures = [repr(r) for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} of 1000 publishes failed, e.g. {failures[:2]}"
        await inbox.wait(1000, timeout=30)
        assert sorted(inbox.items) == sorted(f"p-{r}".encode() for r in rooms)

        changes = [(r, s) for r in rooms for s in ("ann", "bo")]
        for room_id, who in changes:
            join(sender, room_id, who)
        await settle(sender)
        assert await receiver.presence.rooms() == sorted((r, 2) for r in rooms)
        for room_id, who in changes:
            leave(sender, room_id, who)
        await settle(sender)
        assert await receiver.presence.rooms() == [], "no phantom members"
        await inbox.wait(1000 + 4000, timeout=30)  # every join and leave was announced
    finally:
        await sender.close()
        await receiver.close()
        drop_prefix(prefix)


async def test_a_silent_redis_is_noticed_within_seconds_and_delivery_resumes(
    tmp_path: Path,
) -> None:
    """Finding 6: a Redis that stops answering without a TCP reset left the
    subscriber deaf (redis-py's health check discards the pong)."""
    server = RedisServer(tmp_path).start()
    broker = broker_for(server.url, "t", "deaf", ping_interval_s=1.0)
    await broker.start()
    other = redis.asyncio.Redis.from_url(server.url)
    try:
        inbox = Inbox()
        await broker.subscribe("r", inbox)
        await broker.publish("r", b"before")
        await inbox.wait(1)
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        took = await until(lambda: not broker.connected, 10, "silent Redis noticed")
        print(f"silent Redis noticed after {took:.1f} s")
        assert took < 5
        server.resume()
        await inbox.wait(2, timeout=15)
        assert inbox.items[1] is None, "handlers are told to catch up from the store"
        channel = "{t:r}:chan"
        await other.publish(channel, b"after")
        assert (await inbox.wait(3))[2] == b"after"
        await broker.ping()
    finally:
        server.resume()
        await other.aclose()
        await broker.close()
        server.kill()


async def test_a_publish_to_a_frozen_redis_fails_in_bounded_time_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    """The publisher's connection has no socket timeout of its own (redis-py would run
    each send in an extra task); its pipeline is bounded by the broker's timeout_s."""
    async with _subscribed_on_own_redis(tmp_path, "frozen-pub", timeout_s=1.0) as (
        server,
        broker,
        inbox,
    ):
        await broker.publish("r", b"before")
        await inbox.wait(1)
        server.pause()
        started = time.monotonic()
        try:
            await broker.publish("r", b"lost")
        except BrokerError as exc:
            print(f"publish to a frozen Redis failed in {time.monotonic() - started:.2f} s: {exc}")
        else:
            raise AssertionError("a publish to a frozen Redis succeeded")
        assert time.monotonic() - started < 3
        server.resume()
        await until(lambda: broker.connected and None in inbox.items, 10, "resubscribed")
        await broker.publish("r", b"after")  # the publisher is not stuck on the old send
        await until(lambda: b"after" in inbox.items, 5, "the next publish delivered")


@contextlib.asynccontextmanager
async def _subscribed_on_own_redis(
    tmp_path: Path, name: str, *, timeout_s: float
) -> AsyncIterator[tuple[RedisServer, RedisBroker, Inbox]]:
    """A broker on a redis-server of the test's own (to freeze), subscribed to "r"; it
    notices a silent Redis within 0.9 s (pings every 0.3 s)."""
    server = RedisServer(tmp_path).start()
    broker = broker_for(server.url, "t", name, timeout_s=timeout_s, ping_interval_s=0.3)
    await broker.start()
    try:
        inbox = Inbox()
        await broker.subscribe("r", inbox)
        yield server, broker, inbox
    finally:
        server.resume()
        await broker.close()
        server.kill()


async def test_close_leaves_no_connection_open_on_redis(tmp_path: Path) -> None:
    """The broker's clients are made on pools of its own, which redis-py leaves open
    on aclose(): every connection stayed open after close (the publisher's included)."""
    server = RedisServer(tmp_path).start()
    other = redis.asyncio.Redis.from_url(server.url)
    try:
        before = (await other.info("clients"))["connected_clients"]
        broker = broker_for(server.url, "t", "closing")
        await broker.start()
        inbox = Inbox()
        await broker.subscribe("r", inbox)
        await broker.publish("r", b"x")
        await inbox.wait(1)
        assert (await other.info("clients"))["connected_clients"] > before
        await broker.close()
        async with asyncio.timeout(5):
            while (await other.info("clients"))["connected_clients"] > before:
                await asyncio.sleep(0.05)
    finally:
        await other.aclose()
        server.kill()


async def test_a_full_publish_queue_fails_the_publish_at_once_in_call_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen Redis: once the outbox is full, a publish fails at the call (the room's
    writer goes on; other servers read the store), and what was queued goes out in order."""
    monkeypatch.setattr(redis_broker, "_PUBLISH_QUEUE", 2)
    async with _subscribed_on_own_redis(tmp_path, "full", timeout_s=3.0) as (
        server,
        broker,
        inbox,
    ):
        server.pause()
        first = broker.publish("r", b"1")  # taken by the publisher, stuck in Redis
        await asyncio.sleep(0.1)
        queued = [broker.publish("r", b"2"), broker.publish("r", b"3")]
        started = time.monotonic()
        with pytest.raises(BrokerError, match="publishes waiting"):
            await broker.publish("r", b"4")
        assert time.monotonic() - started < 0.1
        server.resume()
        for sent in (first, *queued):
            try:
                await sent
            except BrokerError:
                pass  # timed out in the freeze: other servers read the store
        got = [p for p in inbox.items if p is not None]
        assert got == sorted(got) and b"4" not in got, got


def test_the_publishers_pool_ignores_the_urls_timeout_and_size() -> None:
    broker = RedisBroker(
        f"{REDIS_URL.rstrip('/')}/0?socket_timeout=5&max_connections=8", prefix="t", server_id="u"
    )
    pool = broker._pub.connection_pool
    assert pool.connection_kwargs["socket_timeout"] is None and pool.max_connections == 1


async def test_an_outage_longer_than_the_dead_window_reaps_no_live_member(
    tmp_path: Path,
) -> None:
    """Finding 8: after Redis was unreachable for longer than the heartbeat window,
    the first process to run housekeeping reaped every live process's members (false
    leaves); a removal that failed during the outage was never retried."""
    server = RedisServer(tmp_path).start()
    a = broker_for(server.url, "t", "a")
    b = broker_for(server.url, "t", "b")
    await a.start()
    await b.start()
    try:
        watch_a, watch_b = Inbox(), Inbox()
        await a.subscribe("r", watch_a)
        await b.subscribe("r", watch_b)
        join(a, "r", "alice")
        join(b, "r", "bob")
        join(b, "r", "carol")
        await settle(a)
        await settle(b)
        await watch_a.wait(3)
        assert await a.presence.members("r") == ["alice", "bob", "carol"]

        server.pause()  # 22 s: longer than the 20 s dead window; the data is kept
        leave(b, "r", "carol")  # fails while Redis is down: must be retried
        await asyncio.sleep(22)
        server.resume()
        resumed = time.monotonic()

        def heard(watch: Inbox) -> list[tuple[str, str]]:
            return [e for e in presence_events(watch.items) if e[0] == "leave"]

        try:
            took = await until(
                lambda: ("leave", "carol") in heard(watch_a), 15, "the failed removal applied"
            )
            print(f"carol's leave applied {took:.1f} s after Redis came back")
        except AssertionError as exc:
            print(exc)
        # Watch for false leaves until well past the point where a reaper may act.
        await asyncio.sleep(max(0.0, resumed + b.presence.dead_after_s + 7 - time.monotonic()))
        print("leaves heard:", heard(watch_a), heard(watch_b))
        assert heard(watch_a) == [("leave", "carol")], (
            "carol's leave applied, no live member reaped"
        )
        assert heard(watch_b) == [("leave", "carol")]
        assert await a.presence.members("r") == ["alice", "bob"]
        assert await b.presence.members("r") == ["alice", "bob"]
    finally:
        server.resume()
        await a.close()
        await b.close()
        server.kill()


async def test_a_live_process_whose_members_were_reaped_announces_them_again() -> None:
    """A partitioned (not dead) process's entries may expire and be reaped, with
    leave events; when it heartbeats again it re-adds them and announces the joins."""
    check_shared_redis()
    prefix = unique_prefix()
    a = broker_for(REDIS_URL, prefix, "partitioned")
    b = broker_for(REDIS_URL, prefix, "reaper")
    await a.start()
    await b.start()
    probe = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        watch = Inbox()
        await b.subscribe("r", watch)
        join(a, "r", "alice")
        await settle(a)
        await watch.wait(1)
        # a's heartbeat did not reach Redis for a dead window: its entry expired.
        await probe.zadd(f"{{{prefix}:r}}:m", {f"{a.node}\0alice": 0})
        await b.presence.heartbeat.reap()
        await watch.wait(2)
        assert await b.presence.members("r") == []
        await a.presence.heartbeat.beat()  # a is back
        await watch.wait(3)
        assert presence_events(watch.items) == [
            ("join", "alice"),
            ("leave", "alice"),
            ("join", "alice"),
        ]
        assert await b.presence.members("r") == ["alice"]
        await a.presence.heartbeat.beat()
        await watch.stays_at(3)
    finally:
        await probe.aclose()
        await a.close()
        await b.close()
        drop_prefix(prefix)


async def test_a_change_computed_too_long_ago_is_refused_then_retried() -> None:
    """A script call that sat in a frozen Redis must not act when it thaws: each
    change carries the Redis time it was computed at and is refused when stale."""
    check_shared_redis()
    prefix = unique_prefix()
    a = broker_for(REDIS_URL, prefix, "slow")
    await a.start()
    probe = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        a.presence.heartbeat._offset_ms -= 60_000  # as if computed a minute before Redis runs it
        join(a, "r", "late")
        entries = f"{{{prefix}:r}}:m"
        await asyncio.sleep(0.5)  # the worker tries and is refused: nothing applied
        assert await probe.zcard(entries) == 0
        assert a.presence._dirty, "still queued for a retry"
        await a.presence.heartbeat.beat()  # fresh Redis time: the retry goes through
        await settle(a)
        assert await probe.zrange(entries, 0, -1) == [f"{a.node}\0late".encode()]
    finally:
        await probe.aclose()
        await a.close()
        drop_prefix(prefix)


async def test_the_publisher_rides_a_redis_restart_on_a_fresh_connection(tmp_path: Path) -> None:
    """The publisher keeps one connection; after Redis restarted, the first batch finds
    it dead and is sent again on a new one, instead of failing the publish."""
    server = RedisServer(tmp_path).start()
    broker = broker_for(server.url, "t", "restarted")
    await broker.start()
    try:
        await broker.publish("r", b"before")
        server.restart()
        await broker.publish("r", b"after")  # raises BrokerError if not resent
        other = redis.asyncio.Redis.from_url(server.url)
        try:
            kinds = [c["cmd"] for c in await other.client_list()]
        finally:
            await other.aclose()
        assert kinds.count("publish") == 1, kinds  # one kept publisher connection
    finally:
        await broker.close()
        server.kill()


async def test_a_batch_with_a_refused_command_keeps_the_replies_in_step() -> None:
    """Each item gets its own reply: an error reply is that item's, and the batch
    after it reads its own replies on the same connection."""
    from quartchat.broker.redis_publisher import ConnectionSend

    prefix = unique_prefix()
    pool = redis.asyncio.BlockingConnectionPool.from_url(REDIS_URL, max_connections=1)
    client = redis.asyncio.Redis(connection_pool=pool)
    send = ConnectionSend(pool, "RPUSH")  # RPUSH, which Redis refuses on a string key
    try:
        await client.set(f"{prefix}:s", "x")
        first = await send([(f"{prefix}:a", b"1"), (f"{prefix}:s", b"2"), (f"{prefix}:a", b"3")])
        assert first[0] == 1 and first[2] == 2
        assert isinstance(first[1], redis.exceptions.ResponseError) and "WRONGTYPE" in str(first[1])
        assert list(await send([(f"{prefix}:b", b"4"), (f"{prefix}:a", b"5")])) == [1, 3]
        await send.drop()
        assert await client.lrange(f"{prefix}:a", 0, -1) == [b"1", b"3", b"5"]
    finally:
        await client.delete(f"{prefix}:s", f"{prefix}:a", f"{prefix}:b")
        await client.aclose(close_connection_pool=True)


async def test_payloads_already_read_are_drained_in_order_with_confirmations_between(
    tmp_path: Path,
) -> None:
    """The listener handles what redis-py's parser already holds without a get_message
    each (its cost per payload was most of the listener's): every payload once, in
    order, and a subscribe confirmation read among them still confirms."""
    async with _subscribed_on_own_redis(tmp_path, "drain", timeout_s=5.0) as (
        server,
        broker,
        first,
    ):
        assert broker._ps is not None
        calls = 0
        get_message = broker._ps.get_message

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await get_message(*args, **kwargs)

        broker._ps.get_message = counted  # type: ignore[method-assign]
        second = Inbox()
        channel = broker.keys.channel("r")
        payloads = [f"p{i}".encode() for i in range(2000)]
        other = redis.asyncio.Redis.from_url(server.url)
        try:
            async with other.pipeline(transaction=False) as pipe:
                for p in payloads[:1000]:
                    pipe.publish(channel, p)
                await pipe.execute()
            await broker.subscribe("r2", second)  # its confirmation comes in among payloads
            async with other.pipeline(transaction=False) as pipe:
                for p in payloads[1000:]:
                    pipe.publish(channel, p)
                pipe.publish(broker.keys.channel("r2"), b"second")
                await pipe.execute()
        finally:
            await other.aclose()
        assert await first.wait(2000) == payloads
        assert await second.wait(1) == [b"second"]
        print(f"{calls} get_message calls for 2,001 payloads")
        assert calls < 1000, calls  # most were drained


async def test_a_flood_of_payloads_longer_than_the_timeout_is_not_a_lost_connection(
    tmp_path: Path,
) -> None:
    """Large payloads streaming for three times the listener's timeout (a socket read
    nearly always ends inside one): every one arrives once, in order, and the busy
    connection is never taken for a lost one."""
    async with _subscribed_on_own_redis(tmp_path, "flood", timeout_s=1.0) as (
        server,
        broker,
        inbox,
    ):
        channel = broker.keys.channel("r")
        pad = b"x" * 20_000  # a socket read nearly always ends inside one of these
        sent = 0
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            deadline = time.monotonic() + 3.0  # three times the broker's timeout_s
            while time.monotonic() < deadline:
                async with client.pipeline(transaction=False) as pipe:
                    for _ in range(10):
                        pipe.publish(channel, b"%d:" % sent + pad)
                        sent += 1
                    await pipe.execute()
                await asyncio.sleep(0.02)  # about 10 MB/s: a pace the listener keeps
        finally:
            await client.aclose()
        await inbox.wait(sent, timeout=30)
        assert None not in inbox.items, "the listener reconnected during the flood"
        assert [int(p.split(b":")[0]) for p in inbox.items if p is not None] == list(range(sent))
        assert broker.connected


async def test_the_drain_takes_only_complete_replies_already_read() -> None:
    """A drain that also waited for the rest of a partial reply kept reading for as
    long as payloads kept coming (a read nearly always ends inside one), past the
    listener's timeout: it must hand back at the first incomplete reply."""
    import hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA

    broker = broker_for(REDIS_URL, unique_prefix(), "partial")
    got: list[bytes | None] = []
    channel = broker.keys.channel("r").encode()
    broker._handlers["r"].append(got.append)

    def reply(data: bytes) -> bytes:
        parts = [b"message", channel, data]
        return b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
    whole, partial = reply(b"one"), reply(b"two")
    reader.feed(whole + partial[:-4])

    class Parser:
        _reader = reader

        async def read_response(self) -> Any:  # what waiting for the rest would do
            await asyncio.Event().wait()

    class Conn:
        _parser = Parser()

    class FakePubSub:
        connection = Conn()

    await asyncio.wait_for(drain(FakePubSub(), broker._on_message), 1)  # type: ignore[arg-type]
    assert got == [b"one"]
    reader.feed(partial[-4:])
    await asyncio.wait_for(drain(FakePubSub(), broker._on_message), 1)  # type: ignore[arg-type]
    assert got == [b"one", b"two"]
