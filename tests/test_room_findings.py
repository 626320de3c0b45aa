"""Regression tests for the room-core findings of the "guarantees under races,
bursts, churn and failures" issue (numbers as in the issue). Each drives real
hubs and room actors through their inboxes; only sockets are fakes.

The findings were seen on 5fa4684, the main before the room rebuild (its
child is d5512b1, "Room core rebuilt as a package"). The tests were written
with the rebuild and use its API (``Hub.submit`` with ``quartchat.room``'s
commands, ``RoomActor.settle``, ``Ordering``); 5fa4684's single-module room
differs in parts of it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from quartchat import metrics
from quartchat.broker.memory import MemoryBroker, MemoryPresence
from quartchat.errors import ChatError
from quartchat.hub import Hub
from quartchat.room import History, Join, Leave, Post
from quartchat.room import replay as replay_module
from quartchat.store import Appended, NewMessage, StoredMessage, StoreError
from quartchat.store.database import DatabaseStore

from .conftest import wait_for
from .fakes import Client
from .rooms import join as join_room
from .rooms import payload_of
from .rooms import stored_elsewhere as _stored_elsewhere
from .wsframes import masked, read_frame

ROOM = "finding"


class GatedStore(DatabaseStore):
    """The real store; writes can be held at a gate, reads made to fail."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate: asyncio.Event | None = None
        self.at_gate = asyncio.Event()
        self.reads_fail = 0  # this many reads fail first
        self.counter_fails = 0  # this many start-up counter reads fail first

    async def append(self, room_id: str, posts: Sequence[NewMessage]) -> list[Appended]:
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        return await super().append(room_id, posts)

    async def after(
        self, room_id: str, after_seq: int, upto_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        if self.reads_fail > 0:
            self.reads_fail -= 1
            raise StoreError("injected: read failed")
        return await super().after(room_id, after_seq, upto_seq, limit)

    async def max_seq(self, room_id: str) -> int:
        if self.counter_fails > 0:
            self.counter_fails -= 1
            raise StoreError("injected: database unreachable")
        return await super().max_seq(room_id)


@pytest.fixture
def hub_factory(make_hub: Callable[..., Any]) -> Callable[..., Any]:
    return functools.partial(make_hub, store_cls=GatedStore)


async def join(hub: Hub, c: Client, room: str = ROOM, **kw: Any) -> dict[str, Any]:
    return await join_room(hub, c, room, **kw)


async def post_many(hub: Hub, c: Client, count: int, room: str = ROOM) -> None:
    before = len(c.socket.of("ack"))
    for i in range(count):
        hub.submit(room, Post(c.conn, f"m{i}", None))
        if i % 500 == 499:
            await c.socket.next_of("ack", before + i + 1, timeout=20)
    await c.socket.next_of("ack", before + count, timeout=20)


def seqs_of(c: Client, room: str = ROOM) -> list[int]:
    return [f["seq"] for f in c.socket.frames if f["type"] == "message" and f["room_id"] == room]


def delta(name: str) -> Callable[[], float]:
    """How much a counter moved since this call."""

    def read() -> float:
        return sum(
            s.value
            for m in metrics.REGISTRY.collect()
            for s in m.samples
            if s.name == f"quartchat_{name}_total"
        )

    start = read()
    return lambda: read() - start


# -- 2: a commit slower than any timer is never skipped ----------------------------------


async def test_2_a_slow_commit_on_another_server_is_delivered_not_skipped(hub_factory: Any) -> None:
    shared = MemoryBroker()  # both servers hear each other's publishes
    a, client_a = await hub_factory(broker=shared)
    b, client_b = await hub_factory(broker=shared)
    alice, bob = client_a("alice"), client_b("bob")
    await join(a, alice)
    await join(b, bob)
    # alice's server commits slowly: longer than the old skip timeout (5 s).
    store_a: GatedStore = a.store  # type: ignore[assignment]
    store_a.gate = asyncio.Event()
    a.submit(ROOM, Post(alice.conn, "slow", "slow-1"))
    await asyncio.wait_for(store_a.at_gate.wait(), 5)
    b.submit(ROOM, Post(bob.conn, "fast", "fast-1"))
    await bob.socket.next_of("ack")
    await asyncio.sleep(5.5)
    store_a.gate.set()
    await alice.socket.next_of("ack")
    for c in (alice, bob):
        got = await c.socket.next_of("message", 2)
        assert sorted(m["content"] for m in got) == ["fast", "slow"], c.conn.sender_id
        assert [m["seq"] for m in got] == [1, 2]


# -- 4: join with since_seq ahead of this server's delivery ------------------------------


async def stored_elsewhere(hub: Hub, count: int, room: str = ROOM) -> list[StoredMessage]:
    return await _stored_elsewhere(hub, count, room)


async def test_4_join_since_seq_ahead_of_delivery_gets_no_duplicate(hub_factory: Any) -> None:
    hub, client = await hub_factory(gap_timeout_s=30, position_check_s=60)
    bob = client("bob")
    await join(hub, bob)
    rows = await stored_elsewhere(hub, 2)
    actor = hub.actors[ROOM]
    actor.on_broker(payload_of(rows[1]))  # 2 arrives first and is held behind 1
    await actor.settle()
    carol = client("carol")  # she saw 1 and 2 on another server
    await join(hub, carol, since_seq=2)
    actor.on_broker(payload_of(rows[0]))
    await bob.socket.next_of("message", 2)
    await actor.settle()
    assert seqs_of(bob) == [1, 2]
    assert seqs_of(carol) == [], "nothing at or below since_seq"
    alice = client("alice")
    await join(hub, alice)
    hub.submit(ROOM, Post(alice.conn, "3", None))
    await carol.socket.next_of("message")
    assert seqs_of(carol) == [3]


# -- 5: leave stops a replay; leave + rejoin never interleaves two ----------------------


async def test_5_leave_stops_the_replay_and_a_rejoin_replays_once(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    await post_many(hub, alice, 2000)
    bob = client("bob", queue_size=100)  # replays go page by page behind his queue
    await join(hub, bob, since_seq=0)
    bob.conn.rooms.discard(ROOM)
    hub.submit(ROOM, Leave(bob.conn))
    bob.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(bob.conn, since_seq=0))
    await wait_for(
        lambda: len(seqs_of(bob)) >= 2000 and bob.socket.frames[-1]["type"] == "message", timeout=20
    )
    await hub.actors[ROOM].settle()
    await asyncio.sleep(0.1)
    frames = [f for f in bob.socket.frames if f["type"] in ("joined", "left", "message")]
    left_at = next(i for i, f in enumerate(frames) if f["type"] == "left")
    rejoined_at = next(i for i, f in enumerate(frames) if f["type"] == "joined" and i > left_at)
    assert rejoined_at == left_at + 1, "no replayed frame between left and the new joined"
    second = [f["seq"] for f in frames[rejoined_at:] if f["type"] == "message"]
    assert second == list(range(1, 2001)), "one replay, in order, each once"


async def test_5_a_failed_replay_is_retried_not_reported_as_a_gap(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    await post_many(hub, alice, 50)
    store: GatedStore = hub.store  # type: ignore[assignment]
    store.reads_fail = 2
    bob = client("bob")
    await join(hub, bob, since_seq=10)
    await bob.socket.next_of("message", 40, timeout=10)
    assert seqs_of(bob) == list(range(11, 51))
    assert bob.socket.of("error") == []


# -- 7: drain acks every post still in an inbox before 1001 ------------------------------


class SlowPublishBroker(MemoryBroker):
    """The memory broker whose publishes take a while once ``slow`` is set (Redis busy)."""

    slow = False

    async def publish(self, room_id: str, payload: bytes) -> None:
        if self.slow:
            await asyncio.sleep(0.5)
        await super().publish(room_id, payload)


async def test_7_drain_acks_posts_still_in_the_inbox_before_closing(hub_factory: Any) -> None:
    broker = SlowPublishBroker()
    hub, client = await hub_factory(broker=broker)
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    broker.slow = True
    # bob's join comes first: a room that waits on the broker for it (to announce
    # him) leaves alice's posts in its inbox when the drain begins.
    bob.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(bob.conn))
    for i in range(5):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await asyncio.wait_for(hub.drain(), 10)
    await asyncio.wait_for(alice.writer, 5)
    assert alice.socket.closed_with == 1001
    assert len(alice.socket.of("ack")) == 5, "every accepted post acked before the close"
    assert await hub.store.max_seq(ROOM) == 5


# -- 11: a client far behind is replayed at its own pace, not closed -------------------


async def test_11_a_far_behind_client_is_replayed_not_closed(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    await post_many(hub, alice, 3000)
    bob = client("bob", queue_size=100)
    await join(hub, bob, since_seq=0)
    # Live traffic keeps coming during his replay.
    await post_many(hub, alice, 500)
    await wait_for(lambda: len(seqs_of(bob)) >= 3500, timeout=30)
    assert bob.conn.close_code is None
    assert seqs_of(bob) == list(range(1, 3501))


# -- 13: smaller ones ----------------------------------------------------------------------


async def test_13_a_join_while_the_store_is_down_waits_and_is_removed_on_disconnect(
    hub_factory: Any,
) -> None:
    hub, client = await hub_factory()
    store: GatedStore = hub.store  # type: ignore[assignment]
    store.counter_fails = 2  # the room cannot read its last seq at first
    bob = client("bob")
    bob.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(bob.conn))
    hub.submit(ROOM, Join(bob.conn))  # pipelined
    await bob.socket.next_of("joined", timeout=10)
    assert ROOM in bob.conn.rooms, "the route's set is the route's"
    actor = hub.actors[ROOM]
    assert len(actor.members) == 1
    hub.disconnected(bob.conn)
    await actor.settle()
    assert len(actor.members) == 0


async def test_13_history_needs_no_room_actor(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    bob = client("bob")
    for n in range(50):
        hub.submit(f"h{n}", History(bob.conn, None, 10))
    await bob.socket.next_of("history", 50)
    assert hub.actors == {}


async def test_13_a_dead_actor_is_forgotten_and_its_members_told(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    bob = client("bob")
    await join(hub, bob)
    actor = hub.actors[ROOM]
    assert actor.task is not None
    actor.task.cancel()  # as if it had died
    await asyncio.gather(actor.task, return_exceptions=True)
    await wait_for(lambda: ROOM not in hub.actors)
    left = await bob.socket.next_of("left")
    assert left[-1]["reason"] == "error" and ROOM not in bob.conn.rooms
    await join(hub, bob, since_seq=0)  # a fresh actor serves the room again
    assert hub.actors[ROOM] is not actor


async def test_13_a_slow_consumer_is_closed_and_counted_once(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "STALL_S", 0.3)
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    await post_many(hub, alice, 300)
    closes = delta("slow_consumer_closes")
    live = client("live-but-stuck", queue_size=20, stalled=True)
    live.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(live.conn))
    replaying = client("replay-but-stuck", queue_size=20, stalled=True)
    replaying.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(replaying.conn, since_seq=0))
    await post_many(hub, alice, 100)
    await wait_for(lambda: live.conn.close_code == replaying.conn.close_code == 4008)
    await post_many(hub, alice, 50)
    assert closes() == 2, "one count per closed socket"


async def test_13_a_full_room_refuses_joins_and_posts_but_never_leaves(hub_factory: Any) -> None:
    hub, client = await hub_factory(room_inbox=10)
    alice = client("alice")
    await join(hub, alice)
    store: GatedStore = hub.store  # type: ignore[assignment]
    store.gate = asyncio.Event()
    try:
        refused = 0
        for i in range(30):
            try:
                hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
            except ChatError as exc:
                assert exc.code == "unavailable"
                refused += 1
        assert refused > 0
        other = client("other")
        with pytest.raises(ChatError, match="overloaded"):
            hub.submit(ROOM, Join(other.conn))
        hub.submit(ROOM, Leave(alice.conn))  # always accepted
    finally:
        store.gate.set()
    await alice.socket.next_of("left")


# -- 3: Redis going back in time (restarted from an old snapshot) -----------------------


async def test_3_redis_going_back_in_time_costs_no_message(
    make_hub: Callable[..., Any], tmp_path: Any
) -> None:
    """Two hubs on a private Redis post into one room; Redis is snapshotted (SAVE) after
    10 posts, and after 30 it is killed and started again from that old RDB (its
    channels, presence and every other key as they were 20 posts ago) while posts go
    on. Every member gets every stored seq once, in order; every ack is stored."""
    import redis.asyncio as aioredis

    from quartchat.broker.redis import RedisBroker

    from .redis_util import RedisServer, unique_prefix

    server = RedisServer(tmp_path).start()
    prefix = unique_prefix()
    posted = 0
    acks: list[dict[str, Any]] = []
    try:
        members: list[tuple[Hub, Client]] = []
        for n in range(2):
            broker = RedisBroker(server.url, prefix=prefix, server_id=f"s{n}", timeout_s=1.0)
            hub, client = await make_hub(broker=broker, gap_timeout_s=0.05)
            for k in range(2):
                c = client(f"u{n}{k}")
                await join(hub, c)
                members.append((hub, c))

        async def post(count: int, pause: float = 0.0) -> None:
            nonlocal posted
            for _ in range(count):
                hub, c = members[posted % len(members)]
                hub.submit(ROOM, Post(c.conn, f"a{posted}", f"a{posted}"))
                posted += 1
                await asyncio.sleep(pause)

        async def all_acked() -> None:
            for hub, c in members:
                mine = sum(1 for i in range(posted) if i % len(members) == members.index((hub, c)))
                await c.socket.next_of("ack", mine, timeout=20)

        await post(10)
        await all_acked()
        r = aioredis.Redis.from_url(server.url)
        try:
            assert [k async for k in r.scan_iter(match=f"*{prefix}*")], "the hubs use Redis"
            await r.set("marker:then", 1)
            await r.save()  # the old snapshot: dump.rdb in the server's --dir
            await r.set("marker:later", 1)
        finally:
            await r.aclose()
        await post(20)
        await all_acked()
        # Posts go on while Redis is killed and comes back from the old RDB.
        posting = asyncio.create_task(post(30, pause=0.05))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.kill)  # kill -9: the publishes meanwhile are lost
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.start)  # same port and --dir: it loads the old RDB
        await posting
        r = aioredis.Redis.from_url(server.url)
        try:
            back_in_time = await r.exists("marker:then") and not await r.exists("marker:later")
        finally:
            await r.aclose()
        assert back_in_time, "Redis came back from the old snapshot"
        await all_acked()
        for hub, c in members:
            acks += c.socket.of("ack")
        for hub, c in members:
            await wait_for(lambda c=c: len(seqs_of(c)) >= 60, timeout=20)
        rows = await members[0][0].store.after(ROOM, 0, None, 1000)
        stored = {row.seq: row.content for row in rows}
        assert sorted(stored) == list(range(1, 61))
        assert sorted(a["seq"] for a in acks) == list(range(1, 61)), "every post acked once"
        await asyncio.sleep(0.5)  # a duplicate would arrive by now
        for hub, c in members:
            got = [(f["seq"], f["content"]) for f in c.socket.of("message")]
            assert got == sorted(stored.items()), c.conn.sender_id
    finally:
        server.kill()


# -- 8: presence events lost while the broker was away are told after it ----------------


async def test_8_presence_changes_missed_in_a_reconnect_are_told_after_it(
    hub_factory: Any,
) -> None:
    """Presence events are not stored: a leave (or join) published while this server's
    subscription was down never arrives. After the broker's catch-up signal the room
    re-reads presence and tells its members what changed (seen with a real Redis outage
    in tests/test_faults.py: the leave of a member who closed during it was never heard
    in 2 of 7 runs)."""
    shared = MemoryBroker()
    hub_a, client_a = await hub_factory(broker=shared)
    hub_b, client_b = await hub_factory(broker=shared)
    alice, eve = client_a("alice"), client_b("eve")
    await join(hub_a, alice)
    await join(hub_b, eve)
    await alice.socket.wait(lambda s: any(f.get("sender_id") == "eve" for f in s.of("presence")), 5)
    before = len(alice.socket.of("presence"))
    # What the outage hid: eve gone (her leave lost), zed arrived (his join lost).
    members = shared.presence._rooms[ROOM]
    del members["eve"]
    members["zed"] = 1
    for handler in list(shared._handlers[ROOM]):
        handler(None)  # the broker's "you may have missed something"
    await alice.socket.wait(lambda s: len(s.of("presence")) >= before + 2, 5)
    told = [(f["event"], f["sender_id"]) for f in alice.socket.of("presence")[before:]]
    assert sorted(told) == [("join", "zed"), ("leave", "eve")], told
    await asyncio.sleep(0.2)
    assert len(alice.socket.of("presence")) == before + 2  # nothing else, nothing twice
    bob = client_a("bob")  # the room's own view changed too: a new member is told
    joined = await join(hub_a, bob)
    assert joined["members"] == ["alice", "bob", "zed"], joined


# -- 10: the delivery path never waits for presence ---------------------------------------


SLOW_S = 30.0  # how long each presence operation takes (Redis slow or gone)


class SlowPresence:
    """Presence whose every operation takes ``SLOW_S``: a write (join/leave) is applied,
    and its presence event published, that long after the call; reads and ``settle``
    wait that long too. The calls themselves never block, as the seam promises."""

    def __init__(self, inner: MemoryPresence) -> None:
        self.inner = inner
        self.tasks: set[asyncio.Task[None]] = set()
        self.calls = 0

    def join(self, room_id: str, sender_id: str) -> None:
        self._later(self.inner.join, room_id, sender_id)

    def leave(self, room_id: str, sender_id: str) -> None:
        self._later(self.inner.leave, room_id, sender_id)

    def _later(self, apply: Callable[[str, str], None], room_id: str, sender_id: str) -> None:
        self.calls += 1

        async def slowly() -> None:
            await asyncio.sleep(SLOW_S)
            apply(room_id, sender_id)  # then published on the room's channel

        task = asyncio.create_task(slowly())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def members(self, room_id: str) -> list[str]:
        await asyncio.sleep(SLOW_S)
        return await self.inner.members(room_id)

    async def rooms(self) -> list[tuple[str, int]]:
        await asyncio.sleep(SLOW_S)
        return await self.inner.rooms()

    async def settle(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def clear(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.inner.clear()


class SlowPresenceBroker(MemoryBroker):
    """The memory broker with :class:`SlowPresence`."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = SlowPresence(self._presence)
        self._presence = self.slow  # type: ignore[assignment]


async def test_10_joins_and_messages_do_not_wait_for_presence(hub_factory: Any) -> None:
    hub, client = await hub_factory(broker=SlowPresenceBroker())
    clients = [client(f"u{i}") for i in range(20)]
    async with asyncio.timeout(3):  # far less than one presence read
        for c in clients:
            await join(hub, c)
        hub.submit(ROOM, Post(clients[0].conn, "hello", None))
        for c in clients:
            await c.socket.next_of("message")


# -- 13b: a client gone during the server's close wait leaves no task behind ---------------


async def _raw_socket(server: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand, so the test decides what (not) to answer."""
    import base64
    import os

    host, port = server.url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /chat?sender_id=gone HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _quiet_server(tmp_path: Any, name: str) -> Any:
    """A started `quartchat serve` on SQLite, no rate limit, warnings only."""
    from .servers import ServerProcess

    return ServerProcess(
        tmp_path,
        {
            "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/{name}.db",
            "QUARTCHAT_RATE_PER_S": "0",
            "QUARTCHAT_LOG_LEVEL": "warning",
        },
        name=name,
    ).start()


async def _closed_for_errors(
    server: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A raw socket that earned a server close (250 bad frames: 1008); returns it at the
    moment its close frame arrived, with the close code."""
    reader, writer = await _raw_socket(server)
    while (await read_frame(reader))[0] != 0x1:  # the welcome (maybe after a ping)
        pass
    writer.write(b"".join(masked(0x1, b"not json") for _ in range(250)))
    await writer.drain()
    while True:
        opcode, body = await read_frame(reader)
        if opcode == 0x8:
            return reader, writer, int.from_bytes(body[:2], "big")


async def test_13_a_client_gone_during_the_close_wait_leaves_no_task(tmp_path: Any) -> None:
    """The server closes (1008: too many errors) and waits for the client's close frame
    (session._CLOSE_WAIT_S); the client resets the TCP connection instead of answering.
    Its reader and writer tasks must not outlive the socket: the server's asyncio task
    count (/metrics) comes back to idle."""
    import socket
    import struct

    from .test_churn import _idle, _settled

    server = _quiet_server(tmp_path, "closewait")
    try:
        idle = await _idle(server)

        async def one() -> None:
            _reader, writer, code = await _closed_for_errors(server)
            assert code == 1008
            # No close frame back: reset the connection while the server waits for one.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        async with asyncio.timeout(20):
            await asyncio.gather(*(one() for _ in range(10)))
        g = await _settled(server, idle["asyncio_tasks"], idle["threads"], timeout=10.0)
        assert g["hub_connections"] == 0 and g["connections_open"] == 0, g
        assert g["asyncio_tasks"] <= idle["asyncio_tasks"], (idle, g)
    finally:
        server.stop()


async def test_a_client_that_never_answers_our_close_is_cut_off_after_the_close_wait(
    tmp_path: Any,
) -> None:
    """The read loop runs in the socket's handler task and keeps reading after our close
    (1008) until the client answers it. A client that reads the close frame but never
    answers, and keeps its TCP connection open, is cut off once the close wait
    (session._CLOSE_WAIT_S) is over: the server ends the socket, and no task is left."""
    import time

    from quartchat.session import _CLOSE_WAIT_S

    from .test_churn import _idle, _settled

    server = _quiet_server(tmp_path, "mute")
    try:
        idle = await _idle(server)

        async def one() -> float:
            reader, writer, code = await _closed_for_errors(server)
            assert code == 1008
            closed_at = time.monotonic()
            assert await reader.read() == b""  # no answer from us; the server ends it
            writer.close()
            return time.monotonic() - closed_at

        async with asyncio.timeout(20):
            waits = await asyncio.gather(*(one() for _ in range(5)))
        assert all(w < 2 * _CLOSE_WAIT_S + 1.0 for w in waits), waits
        g = await _settled(server, idle["asyncio_tasks"], idle["threads"], timeout=10.0)
        assert g["hub_connections"] == 0 and g["connections_open"] == 0, g
        assert g["asyncio_tasks"] <= idle["asyncio_tasks"], (idle, g)
    finally:
        server.stop()


# -- 13e: the store's set of rooms it knows have a counter row stays bounded ------------


async def test_13_the_stores_known_rooms_stay_bounded_and_appends_still_work(
    store: DatabaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quartchat.store import database

    monkeypatch.setattr(database, "_KNOWN_ROOMS_MAX", 5)

    def post(i: int) -> NewMessage:
        return NewMessage(f"id-{i}", "alice", f"c{i}", f"m{i}", 1_700_000_000_000 + i)

    n = 0
    for round_ in range(3):  # rooms forgotten by the bound are written again
        for k in range(12):
            (answer,) = await store.append(f"known-{k}", [post(n)])
            n += 1
            assert answer.created and answer.row.seq == round_ + 1, (round_, k)
            assert len(store._known_rooms) <= 5
    for k in range(12):
        rows = await store.after(f"known-{k}", 0, None, 10)
        assert [r.seq for r in rows] == [1, 2, 3]
        assert await store.max_seq(f"known-{k}") == 3


async def test_10_joins_leaves_and_messages_do_not_wait_for_presence_writes(
    hub_factory: Any,
) -> None:
    """Every presence operation (read, join/leave write, its publish) takes 30 s: 20
    joins, 10 leaves and a message on each of two hubs still complete within 3 s."""
    shared = SlowPresenceBroker()
    a, client_a = await hub_factory(broker=shared)
    b, client_b = await hub_factory(broker=shared)
    clients = [(a, client_a(f"a{i}")) for i in range(10)] + [
        (b, client_b(f"b{i}")) for i in range(10)
    ]
    async with asyncio.timeout(3):  # one presence operation takes 10 times as long
        for hub, c in clients:
            await join(hub, c)
        for hub, c in clients[5:15]:
            c.conn.rooms.discard(ROOM)
            hub.submit(ROOM, Leave(c.conn))
        for hub, c in clients[5:15]:
            await c.socket.next_of("left")
        staying = clients[:5] + clients[15:]
        a.submit(ROOM, Post(clients[0][1].conn, "from a", None))
        b.submit(ROOM, Post(clients[-1][1].conn, "from b", None))
        for hub, c in staying:
            got = await c.socket.next_of("message", 2)
            assert sorted(m["content"] for m in got) == ["from a", "from b"]
    assert shared.slow.calls == 20 + 10, "the joins and leaves did reach the slow presence"
    assert shared.slow.tasks, "and were still being applied"


async def test_10_a_reconnect_storm_does_not_delay_a_message(hub_factory: Any) -> None:
    """200 members leave and rejoin at once (presence slow as above); a message posted
    in the middle of the storm reaches every member within 3 s."""
    hub, client = await hub_factory(broker=SlowPresenceBroker())
    clients = [client(f"s{i}") for i in range(200)]
    for c in clients:
        await join(hub, c)
    poster = clients[0]
    async with asyncio.timeout(3):
        for c in clients[1:]:
            c.conn.rooms.discard(ROOM)
            hub.submit(ROOM, Leave(c.conn))
            c.conn.rooms.add(ROOM)
            hub.submit(ROOM, Join(c.conn, since_seq=0))
        hub.submit(ROOM, Post(poster.conn, "in the storm", None))
        for c in clients[1:]:  # and the storm goes on behind it
            c.conn.rooms.discard(ROOM)
            hub.submit(ROOM, Leave(c.conn))
            c.conn.rooms.add(ROOM)
            hub.submit(ROOM, Join(c.conn, since_seq=1))
        for c in clients:
            got = await c.socket.next_of("message", timeout=3)
            assert [m["content"] for m in got] == ["in the storm"], c.conn.sender_id
        for c in clients[1:]:
            await c.socket.next_of("joined", 3)
    await asyncio.sleep(0.2)
    for c in clients:
        assert len(c.socket.of("message")) == 1, "once, not replayed again after since_seq=1"


async def test_2_after_a_slow_commit_since_seq_replays_it_exactly_and_hubs_agree(
    hub_factory: Any,
) -> None:
    """The slow-commit scenario, then: a member who left after seeing only the fast
    message rejoins on the other server with ``since_seq``, and a newcomer joins with
    ``since_seq=0``. Both get exactly what the store holds after their position, and
    every member on both hubs has the same (seq, content) list."""
    shared = MemoryBroker()
    a, client_a = await hub_factory(broker=shared)
    b, client_b = await hub_factory(broker=shared)
    alice, bob, erin = client_a("alice"), client_b("bob"), client_b("erin")
    await join(a, alice)
    await join(b, bob)
    await join(b, erin)
    store_a: GatedStore = a.store  # type: ignore[assignment]
    store_a.gate = asyncio.Event()
    a.submit(ROOM, Post(alice.conn, "slow", "slow-1"))
    await asyncio.wait_for(store_a.at_gate.wait(), 5)
    b.submit(ROOM, Post(bob.conn, "fast", "fast-1"))
    await bob.socket.next_of("ack")
    await bob.socket.next_of("message")
    seen = seqs_of(bob)
    bob.conn.rooms.discard(ROOM)  # bob goes away having seen only the fast one
    b.submit(ROOM, Leave(bob.conn))
    await bob.socket.next_of("left")
    await asyncio.sleep(5.5)  # longer than the old skip timeout
    store_a.gate.set()
    await alice.socket.next_of("ack")
    rows = await a.store.after(ROOM, 0, None, 100)
    stored = [(r.seq, r.content) for r in rows]
    assert stored == [(1, "fast"), (2, "slow")]
    bob_again = client_a("bob")  # reconnects to the other server
    await join(a, bob_again, since_seq=seen[-1])
    carol = client_b("carol")
    await join(b, carol, since_seq=0)

    def pairs(c: Client) -> list[tuple[int, str]]:
        return [(f["seq"], f["content"]) for f in c.socket.of("message")]

    await bob_again.socket.next_of("message", len(stored) - seen[-1])
    for c in (alice, erin, carol):
        await c.socket.next_of("message", 2)
    await asyncio.sleep(0.3)  # a duplicate or a late extra would be here by now
    assert seen == [1]
    assert pairs(bob_again) == stored[seen[-1] :], "exactly after since_seq"
    assert pairs(carol) == stored
    assert pairs(alice) == pairs(erin) == stored, "both hubs hand out the same list"


# -- 6: a publish that fails on the writer's path loses nothing ----------------------------


class PublishFailsBroker:
    """Another server's view of a shared memory broker whose publishes all fail
    (Redis refusing the PUBLISH); subscriptions and presence work."""

    def __init__(self, shared: MemoryBroker, bug: bool = False) -> None:
        self._shared = shared
        self.failed = 0
        self.bug = bug  # raise what no broker should (a bug), not BrokerError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)

    async def publish(self, room_id: str, payload: bytes) -> None:
        from quartchat.broker import BrokerError

        self.failed += 1
        if self.bug:
            raise RuntimeError("injected: a bug in the broker")
        raise BrokerError("injected: publish failed")

    async def close(self) -> None:
        return None  # the shared broker is the other hub's to close


@pytest.mark.parametrize("bug", [False, True], ids=["broker-error", "unexpected-exception"])
async def test_6_a_failed_publish_is_acked_and_reaches_the_other_server(
    hub_factory: Any, bug: bool
) -> None:
    """alice's server cannot publish. Her post (the room's last message: no later one
    reveals the hole) is still stored and acked, and reaches bob on the other server
    within seconds, by that server's position check (2 s by default). Also when the
    publish raises something other than BrokerError: that used to end the room's
    writer, so later posts were never acked."""
    shared = MemoryBroker()
    failing = PublishFailsBroker(shared, bug=bug)
    a, client_a = await hub_factory(broker=failing)
    b, client_b = await hub_factory(broker=shared)
    alice, bob = client_a("alice"), client_b("bob")
    await join(a, alice)
    await join(b, bob)
    a.submit(ROOM, Post(alice.conn, "unpublished", "u-1"))
    ack = (await alice.socket.next_of("ack"))[-1]
    assert ack["seq"] == 1 and ack["client_msg_id"] == "u-1"
    assert [r.content for r in await b.store.after(ROOM, 0, None, 10)] == ["unpublished"]
    await alice.socket.next_of("message")  # delivered on its own server at once
    got = await bob.socket.next_of("message", timeout=5)
    assert [(m["seq"], m["content"]) for m in got] == [(1, "unpublished")]
    assert failing.failed == 1, "the publish was tried, and failed"
    # The writer goes on: the next post is stored, acked and reaches bob too.
    a.submit(ROOM, Post(alice.conn, "next", "u-2"))
    assert (await alice.socket.next_of("ack", 2))[-1]["seq"] == 2
    got = await bob.socket.next_of("message", 2, timeout=5)
    assert [(m["seq"], m["content"]) for m in got] == [(1, "unpublished"), (2, "next")]
    assert failing.failed == 2
    await asyncio.sleep(0.3)
    assert len(bob.socket.of("message")) == 2
