"""Room actor tests: a real RoomActor driven through its inbox (via the hub),
the memory broker and a real SQLite store; only the sockets are fakes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from quartchat.hub import Hub
from quartchat.room import History, Join, Leave, Post
from quartchat.store import Appended, NewMessage, StoredMessage, StoreError
from quartchat.store.database import DatabaseStore

from .conftest import wait_for
from .fakes import Client
from .rooms import join as join_room
from .rooms import payload_of
from .rooms import stored_elsewhere as _stored_elsewhere

ROOM = "room101"


class RecordingStore(DatabaseStore):
    """The real store, recording each write's batch size; can hold writes back."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[int] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.down = False  # fault injection: writes fail as if the database were gone
        self.lose_reply = False  # fault injection: the write commits, then the reply is lost
        self.pages_down = False  # fault injection: history pages fail

    async def page(
        self, room_id: str, before_seq: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        if self.pages_down:
            raise StoreError("injected: database unreachable")
        return await super().page(room_id, before_seq, limit)

    async def append(self, room_id: str, posts: Sequence[NewMessage]) -> list[Appended]:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreError("injected: database unreachable")
        answers = await super().append(room_id, posts)
        self.batches.append(len(posts))
        if self.lose_reply:
            self.lose_reply = False
            raise StoreError("injected: connection reset after COMMIT was sent")
        return answers


@pytest.fixture
def hub_factory(make_hub: Callable[..., Any]) -> Callable[..., Any]:
    return functools.partial(make_hub, store_cls=RecordingStore)


async def join(hub: Hub, c: Client, room: str = ROOM, **kw: Any) -> dict[str, Any]:
    return await join_room(hub, c, room, **kw)


async def stored_elsewhere(hub: Hub, room: str, count: int) -> list[StoredMessage]:
    return await _stored_elsewhere(hub, count, room)


async def test_messages_are_stored_acked_and_delivered_in_seq_order(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    await join(hub, bob)
    for i in range(50):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", f"id{i}"))
    acks = await alice.socket.next_of("ack", 50)
    got = await bob.socket.next_of("message", 50)
    assert [m["seq"] for m in got] == list(range(1, 51))
    assert [m["content"] for m in got] == [f"m{i}" for i in range(50)]
    assert sorted(a["seq"] for a in acks) == list(range(1, 51))
    assert {a["client_msg_id"] for a in acks} == {f"id{i}" for i in range(50)}
    rows = await hub.store.after(ROOM, 0, None, 100)
    assert [r.seq for r in rows] == list(range(1, 51))
    # The sender sees its own messages too, same order.
    mine = await alice.socket.next_of("message", 50)
    assert [m["id"] for m in mine] == [m["id"] for m in got]


async def test_ack_comes_only_after_commit(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    store: RecordingStore = hub.store  # type: ignore[assignment]
    store.gate = asyncio.Event()
    alice = client("alice")
    await join(hub, alice)
    hub.submit(ROOM, Post(alice.conn, "held", None))
    await asyncio.wait_for(store.entered.wait(), 5)
    await asyncio.sleep(0.05)
    assert alice.socket.of("ack") == [] and alice.socket.of("message") == []
    assert await store.max_seq(ROOM) == 0
    store.gate.set()
    ack = (await alice.socket.next_of("ack"))[0]
    assert ack["client_msg_id"] is None and ack["seq"] == 1
    assert await store.max_seq(ROOM) == 1


async def test_posts_are_batched_while_a_write_is_in_flight(hub_factory: Any) -> None:
    hub, client = await hub_factory(batch_max=100)
    store: RecordingStore = hub.store  # type: ignore[assignment]
    store.gate = asyncio.Event()
    alice = client("alice")
    await join(hub, alice)
    hub.submit(ROOM, Post(alice.conn, "first", None))
    await asyncio.wait_for(store.entered.wait(), 5)
    for i in range(250):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await wait_for(lambda: hub.actors[ROOM]._inbox.empty())
    store.gate.set()
    await alice.socket.next_of("ack", 251)
    assert store.batches == [1, 100, 100, 50]
    seqs = [m["seq"] for m in await alice.socket.next_of("message", 251)]
    assert seqs == list(range(1, 252))


async def test_retry_with_same_client_msg_id_is_stored_once(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    await join(hub, bob)
    hub.submit(ROOM, Post(alice.conn, "hello", "once"))
    first = (await alice.socket.next_of("ack"))[0]
    # Same id twice more: once alone, once twice inside one batch.
    hub.submit(ROOM, Post(alice.conn, "hello", "once"))
    hub.submit(ROOM, Post(alice.conn, "other", "two"))
    hub.submit(ROOM, Post(alice.conn, "other", "two"))
    acks = await alice.socket.next_of("ack", 4)
    assert acks[1]["seq"] == first["seq"] and acks[1]["id"] == first["id"]
    assert acks[2]["seq"] == acks[3]["seq"] == 2
    await bob.socket.next_of("message", 2)
    await asyncio.sleep(0.1)
    assert [m["content"] for m in bob.socket.of("message")] == ["hello", "other"]
    assert await hub.store.max_seq(ROOM) == 2
    # Another sender may reuse the same client_msg_id: it is a different message.
    hub.submit(ROOM, Post(bob.conn, "bob's", "once"))
    ack = (await bob.socket.next_of("ack"))[0]
    assert ack["seq"] == 3


async def test_seq_continues_from_the_store_after_restart(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    for i in range(5):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 5)
    await hub.stop()

    hub2, client2 = await hub_factory()  # fresh broker, same database file
    carol = client2("carol")
    joined = await join(hub2, carol)
    assert joined["last_seq"] == 5
    hub2.submit(ROOM, Post(carol.conn, "after restart", None))
    ack = (await carol.socket.next_of("ack"))[0]
    assert ack["seq"] == 6


async def test_idle_room_actor_retires_and_comes_back(hub_factory: Any) -> None:
    hub, client = await hub_factory(room_idle_s=0.1)
    alice = client("alice")
    await join(hub, alice)
    hub.submit(ROOM, Post(alice.conn, "x", None))
    await alice.socket.next_of("ack")
    actor = hub.actors[ROOM]
    await asyncio.sleep(0.3)
    assert ROOM in hub.actors, "a room with a member never retires"
    alice.conn.rooms.discard(ROOM)
    hub.submit(ROOM, Leave(alice.conn))
    await alice.socket.next_of("left")
    await wait_for(lambda: ROOM not in hub.actors)
    assert actor.task is not None
    await asyncio.wait_for(actor.task, 5)
    # The next use starts a new actor that continues the room.
    joined = await join(hub, alice)
    assert joined["last_seq"] == 1 and hub.actors[ROOM] is not actor


async def test_slow_subscriber_is_closed_with_4008_and_others_keep_receiving(
    hub_factory: Any,
) -> None:
    hub, client = await hub_factory(outbound_queue=20)
    fast, slow = client("fast", queue_size=20), client("slow", queue_size=20, stalled=True)
    await join(hub, fast)
    # The stalled socket never reads its joined frame: join it by hand.
    slow.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(slow.conn))
    for i in range(60):
        hub.submit(ROOM, Post(fast.conn, f"m{i}", None))
        if i % 10 == 9:
            await fast.socket.next_of("message", i + 1)
    got = await fast.socket.next_of("message", 60)
    assert [m["seq"] for m in got] == list(range(1, 61))
    assert slow.conn.close_code == 4008
    await asyncio.wait_for(slow.writer, 5)  # the stalled send was interrupted
    assert slow.socket.closed_with == 4008


async def test_reorder_buffer_delivers_by_seq(hub_factory: Any) -> None:
    hub, client = await hub_factory(gap_timeout_s=5)
    bob = client("bob")
    await join(hub, bob)
    actor = hub.actors[ROOM]
    rows = await stored_elsewhere(hub, ROOM, 3)
    # Another server's messages arrive out of order: 3, 1, 2.
    for seq in (3, 1, 2):
        actor.on_broker(payload_of(rows[seq - 1]))
    got = await bob.socket.next_of("message", 3)
    assert [m["seq"] for m in got] == [1, 2, 3]
    # A duplicate is dropped.
    actor.on_broker(payload_of(rows[1]))
    await actor.settle()
    assert len(bob.socket.of("message")) == 3


async def test_gap_is_filled_from_the_store(hub_factory: Any) -> None:
    hub, client = await hub_factory(gap_timeout_s=0.05)
    bob = client("bob")
    await join(hub, bob)
    # Seqs 1..3 reached the store, but only 3's notification reached us.
    rows = await stored_elsewhere(hub, ROOM, 3)
    hub.actors[ROOM].on_broker(payload_of(rows[2]))
    got = await bob.socket.next_of("message", 3)
    assert [m["seq"] for m in got] == [1, 2, 3]
    assert [m["content"] for m in got] == ["c0", "c1", "c2"]


async def test_a_seq_the_store_does_not_hold_is_passed_over_after_a_complete_read(
    hub_factory: Any, sync_sql: Any
) -> None:
    hub, client = await hub_factory(gap_timeout_s=0.05)
    bob = client("bob")
    await join(hub, bob)
    rows = await stored_elsewhere(hub, ROOM, 2)
    await sync_sql(f"DELETE FROM messages WHERE room_id = '{ROOM}' AND seq = 1")  # an operator
    hub.actors[ROOM].on_broker(payload_of(rows[1]))
    got = await bob.socket.next_of("message", 1)
    assert [m["seq"] for m in got] == [2]


async def test_broker_loss_notice_backfills_from_the_store(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    bob = client("bob")
    await join(hub, bob)
    await stored_elsewhere(hub, ROOM, 2)
    hub.actors[ROOM].on_broker(None)  # "you may have missed payloads"
    got = await bob.socket.next_of("message", 2)
    assert [m["seq"] for m in got] == [1, 2]


async def test_a_lost_last_message_is_found_by_the_position_check(hub_factory: Any) -> None:
    """Finding 6: a message whose publish never arrived is delivered within seconds
    even if the room never gets another message."""
    hub, client = await hub_factory(position_check_s=0.2)
    bob = client("bob")
    await join(hub, bob)
    await stored_elsewhere(hub, ROOM, 1)  # stored; its publish was lost
    got = await bob.socket.next_of("message", 1, timeout=3)
    assert [m["seq"] for m in got] == [1]


async def test_join_since_seq_replays_then_goes_live_without_gap_or_duplicate(
    hub_factory: Any,
) -> None:
    hub, client = await hub_factory()
    store: RecordingStore = hub.store  # type: ignore[assignment]
    alice = client("alice")
    await join(hub, alice)
    for i in range(30):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 30)
    # Hold the next writes back so live traffic overlaps the replay.
    bob = client("bob")
    joined = await join(hub, bob, since_seq=10)
    assert joined["last_seq"] == 30
    for i in range(30, 40):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    got = await bob.socket.next_of("message", 30)
    assert [m["seq"] for m in got] == list(range(11, 41))
    first_message = next(i for i, f in enumerate(bob.socket.frames) if f["type"] == "message")
    assert bob.socket.frames.index(joined) < first_message
    del store


async def test_join_with_history_replays_the_last_n(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    for i in range(10):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 10)
    bob = client("bob")
    await join(hub, bob, history=3)
    got = await bob.socket.next_of("message", 3)
    assert [m["seq"] for m in got] == [8, 9, 10]
    # since_seq beyond the newest replays nothing.
    carol = client("carol")
    await join(hub, carol, since_seq=99)
    await asyncio.sleep(0.05)
    assert carol.socket.of("message") == []


async def test_history_pages_back(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    for i in range(7):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 7)
    hub.submit(ROOM, History(alice.conn, None, 3))
    page = (await alice.socket.next_of("history"))[0]
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7] and page["has_more"] is True
    hub.submit(ROOM, History(alice.conn, 5, 10))
    page = (await alice.socket.next_of("history", 2))[1]
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4] and page["has_more"] is False


async def test_presence_counts_a_sender_once_across_connections(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    bob = client("bob")
    await join(hub, bob)
    a1, a2 = client("alice"), client("alice")
    joined = await join(hub, a1)
    assert joined["members"] == ["alice", "bob"]
    await join(hub, a2)
    ev = await bob.socket.next_of("presence")
    assert ev == [{"type": "presence", "room_id": ROOM, "event": "join", "sender_id": "alice"}]
    assert a1.socket.of("presence") == [], "nobody hears about themselves"
    hub.submit(ROOM, Leave(a1.conn))
    await a1.socket.next_of("left")
    await asyncio.sleep(0.05)
    assert len(bob.socket.of("presence")) == 1, "alice is still here on another connection"
    hub.disconnected(a2.conn)  # the last connection goes away without a leave
    ev = await bob.socket.next_of("presence", 2)
    assert ev[1]["event"] == "leave" and ev[1]["sender_id"] == "alice"
    assert await hub.reads.members(ROOM) == ["bob"]
    assert await hub.reads.rooms() == [(ROOM, 1)]


async def test_store_down_answers_unavailable_and_delivers_nothing(hub_factory: Any) -> None:
    hub, client = await hub_factory(gap_timeout_s=0.05)
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    await join(hub, bob)
    store: RecordingStore = hub.store  # type: ignore[assignment]
    store.down = True  # the database goes away
    hub.submit(ROOM, Post(alice.conn, "lost?", "k1"))
    err = (await alice.socket.next_of("error"))[0]
    assert err["code"] == "unavailable" and err["client_msg_id"] == "k1"
    await asyncio.sleep(0.05)
    assert alice.socket.of("ack") == [] and bob.socket.of("message") == []
    store.down = False  # it comes back: the retry works
    hub.submit(ROOM, Post(alice.conn, "retry", "k1"))
    ack = (await alice.socket.next_of("ack"))[0]
    got = await bob.socket.next_of("message")
    assert got[0]["seq"] == ack["seq"] and got[0]["content"] == "retry"


async def test_a_commit_whose_reply_was_lost_is_still_delivered_once(hub_factory: Any) -> None:
    hub, client = await hub_factory(gap_timeout_s=0.05, position_check_s=0.2)
    store: RecordingStore = hub.store  # type: ignore[assignment]
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    await join(hub, bob)
    store.lose_reply = True  # stored, but the writer is told it failed
    hub.submit(ROOM, Post(alice.conn, "ambiguous", "k1"))
    err = (await alice.socket.next_of("error"))[0]
    assert err["code"] == "unavailable"
    # Nobody published it, yet it is stored: the position check delivers it.
    got = await bob.socket.next_of("message", 1, timeout=3)
    assert [(m["seq"], m["content"]) for m in got] == [(1, "ambiguous")]
    # The client retries with the same client_msg_id: acked with the original.
    hub.submit(ROOM, Post(alice.conn, "ambiguous", "k1"))
    ack = (await alice.socket.next_of("ack"))[0]
    assert ack["seq"] == 1
    hub.submit(ROOM, Post(alice.conn, "next", "k2"))
    got = await bob.socket.next_of("message", 2)
    assert [(m["seq"], m["content"]) for m in got] == [(1, "ambiguous"), (2, "next")]
    await asyncio.sleep(0.3)
    assert len(bob.socket.of("message")) == 2, "delivered once"


async def test_errors_sent_by_the_hub_and_the_room_echo_their_command(hub_factory: Any) -> None:
    """The errors answered after the session handed a command on (by the hub, or
    the room's actor) echo that command's action, room and client_msg_id."""
    hub, client = await hub_factory()
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    store: RecordingStore = hub.store  # type: ignore[assignment]

    def errors(c: Client, n: int) -> list[dict[str, Any]]:
        got = c.socket.of("error")[-n:]
        for frame in got:
            assert frame.pop("message")
        return got

    hub.submit(ROOM, Post(bob.conn, "not a member", "b1"))  # the actor refuses it
    hub.submit(ROOM, Leave(bob.conn))  # the actor: not a member
    hub.submit("nowhere", Leave(bob.conn))  # no actor: the hub answers (at once)
    await bob.socket.next_of("error", 3)
    assert errors(bob, 3) == [
        {"type": "error", "code": "not_joined", "action": "leave", "room_id": "nowhere"},
        {
            "type": "error",
            "code": "not_joined",
            "action": "message",
            "room_id": ROOM,
            "client_msg_id": "b1",
        },
        {"type": "error", "code": "not_joined", "action": "leave", "room_id": ROOM},
    ]
    store.down = True  # the writer's batch fails
    hub.submit(ROOM, Post(alice.conn, "lost", "a1"))
    await alice.socket.next_of("error")
    store.down, store.pages_down = False, True  # a history read fails
    hub.submit(ROOM, History(alice.conn, None, 5))
    await alice.socket.next_of("error", 2)
    assert errors(alice, 2) == [
        {
            "type": "error",
            "code": "unavailable",
            "action": "message",
            "room_id": ROOM,
            "client_msg_id": "a1",
        },
        {"type": "error", "code": "unavailable", "action": "history", "room_id": ROOM},
    ]
    # The actor dies: its members are told to join again.
    task = hub.actors[ROOM].task
    assert task is not None
    task.cancel()
    await alice.socket.next_of("left")
    assert errors(alice, 1) == [
        {"type": "error", "code": "internal", "action": "join", "room_id": ROOM}
    ]
    assert alice.socket.of("left")[-1] == {"type": "left", "room_id": ROOM, "reason": "error"}


async def test_a_command_the_actor_fails_on_is_answered_internal_with_its_echo(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one command is an ``internal`` error echoing that command
    (action, room, client_msg_id; it echoed the room only), and the room lives on."""
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    actor = hub.actors[ROOM]

    def broken(_cmd: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(actor, "_on_post", broken)
    hub.submit(ROOM, Post(alice.conn, "boom", "a9"))
    await alice.socket.next_of("error")
    frame = alice.socket.of("error")[-1]
    assert frame.pop("message")
    assert frame == {
        "type": "error",
        "code": "internal",
        "action": "message",
        "room_id": ROOM,
        "client_msg_id": "a9",
    }
    monkeypatch.undo()
    hub.submit(ROOM, Post(alice.conn, "fine", "a10"))
    acks = await alice.socket.next_of("ack")
    assert acks[-1]["client_msg_id"] == "a10"


async def test_stopping_a_stopped_hub_does_nothing(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    await join(hub, client("alice"))
    await hub.stop()
    await hub.stop()  # nothing left to stop: no second close of the store or the broker
    assert not hub.actors and hub.draining
