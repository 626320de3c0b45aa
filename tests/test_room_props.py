"""Property tests of rooms driven through their inboxes: two servers (hubs)
sharing one database, a broker that loses, duplicates and reorders
notifications, store reads that fail or are slow, writes that fail, posts
and retries from many clients, joins with any ``since_seq`` or ``history``,
leaves during replays, and a drain of one server (its members reconnect to
the other with ``since_seq``).

Invariants, for every example:
- every member's stream is strictly increasing (no duplicate, no step back);
- from its join point on, a member's stream is exactly the store's contents
  (no gap, nothing skipped that the store holds), up to where it left;
- a member that stays joined ends with every stored message after its join
  point, whatever was lost on the way (the position check and gap reads heal);
- every acked message is in the store, with the acked seq; a retried
  ``client_msg_id`` is stored once; a post answered ``unavailable`` (its write
  failed) and never acked is not in the store (nothing half-stored);
- a drain answers every post its room accepted (ack or error) before the
  socket is closed with 1001.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quartchat.broker import Handler
from quartchat.broker.memory import MemoryPresence
from quartchat.config import Settings
from quartchat.errors import ChatError
from quartchat.hub import Hub
from quartchat.migrate import upgrade
from quartchat.room import Join, Leave, Post
from quartchat.store import Appended, NewMessage, StoredMessage, StoreError
from quartchat.store.database import DatabaseStore

from .fakes import Client

ROOMS = ("r1", "r2")
STATS: list[int] = []  # messages stored per example, for the closing note
# How often each harder step really ran, over all examples.
EXERCISED: dict[str, int] = defaultdict(int)
_TEMPLATE: Path | None = None


def template_db() -> Path:
    """One migrated SQLite file, copied for every example (migrating costs ~0.2 s)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        path = Path(tempfile.mkdtemp(prefix="qc-props-")) / "template.db"
        upgrade(f"sqlite+aiosqlite:///{path}")
        _TEMPLATE = path
    return _TEMPLATE


class Bus:
    """What Redis would be for two processes: notifications per handler, which
    the test delivers, loses, duplicates and reorders at will."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Handler]] = defaultdict(list)
        self.pending: list[tuple[Handler, bytes]] = []

    def publish(self, room_id: str, payload: bytes) -> None:
        for handler in self.handlers[room_id]:
            self.pending.append((handler, payload))


class ChaosBroker:
    """One process's view of the bus; presence stays local (not under test here)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._presence = MemoryPresence(lambda room_id, payload: None)

    @property
    def presence(self) -> MemoryPresence:
        return self._presence

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def subscribe(self, room_id: str, handler: Handler) -> None:
        self.bus.handlers[room_id].append(handler)

    async def unsubscribe(self, room_id: str, handler: Handler) -> None:
        if handler in self.bus.handlers[room_id]:
            self.bus.handlers[room_id].remove(handler)

    async def publish(self, room_id: str, payload: bytes) -> None:
        self.bus.publish(room_id, payload)


class FlakyStore(DatabaseStore):
    """The real store whose reads fail while ``failing`` is set, take ``read_delay``
    seconds more, and whose writes fail (nothing stored) while ``writes_fail`` is set."""

    failing = False
    read_delay = 0.0
    writes_fail = False

    async def after(
        self, room_id: str, after_seq: int, upto_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        if self.failing:
            raise StoreError("injected: read failed")
        if self.read_delay:
            EXERCISED["slow reads"] += 1
        await asyncio.sleep(self.read_delay)
        return await super().after(room_id, after_seq, upto_seq, limit)

    async def page(
        self, room_id: str, before_seq: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        if self.failing:
            raise StoreError("injected: read failed")
        await asyncio.sleep(self.read_delay)
        return await super().page(room_id, before_seq, limit)

    async def max_seq(self, room_id: str) -> int:
        await asyncio.sleep(self.read_delay)
        return await super().max_seq(room_id)

    async def append(self, room_id: str, posts: Sequence[NewMessage]) -> list[Appended]:
        if self.writes_fail:
            EXERCISED["failed writes"] += len(posts)
            raise StoreError("injected: write failed")
        return await super().append(room_id, posts)


@attrs.define
class Seat:
    """A client slot: its current connection on one of the hubs."""

    hub: int
    client: Client | None = None
    room: str = "r1"
    posted: list[str] = attrs.Factory(list)


# Steps: (kind, a, b) with small integers chosen by hypothesis.
STEP = st.tuples(st.integers(0, 15), st.integers(0, 7), st.integers(0, 1000))
POSTS = (0, 1, 2, 13, 14, 15)  # kinds that post: the others dilute them less
EXAMPLES = 60


# One hand-built interleaving that takes every harder step (failed writes and the
# posts they refuse, slow reads under joins with since_seq, a drain), so the check
# below never rests on the random examples alone drawing each of them (one run in
# about five missed one).
EVERY_STEP = [
    *[(3, 0, 0), (3, 1, 0), (3, 2, 1), (0, 0, 0), (1, 1, 0), (9, 0, 10), (5, 0, 0)],
    *[(6, 0, 0), (11, 0, 1), (11, 1, 1), (0, 0, 0), (0, 1, 0), (2, 2, 0), (9, 0, 19)],
    *[(11, 0, 0), (11, 1, 0), (10, 0, 3), (10, 1, 3), (3, 3, 5), (3, 4, 9), (0, 3, 0)],
    *[(9, 0, 19), (12, 0, 0), (0, 0, 0), (0, 1, 0), (9, 0, 19)],
]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(STEP, min_size=10, max_size=80))
@example(steps=EVERY_STEP)
def run_examples(steps: Sequence[tuple[int, int, int]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(steps), 60))


def test_rooms_keep_order_and_lose_nothing_under_any_interleaving() -> None:
    STATS.clear()
    EXERCISED.clear()
    run_examples()
    posting = [n for n in STATS if n > 0]
    print(
        f"STATS: {len(STATS)} examples, {len(posting)} of them stored messages, "
        f"{sum(STATS)} stored in all (max {max(STATS, default=0)}); exercised {dict(EXERCISED)}"
    )
    # The examples really post, and the harder steps really happen.
    assert len(STATS) >= EXAMPLES and len(posting) >= EXAMPLES // 2, STATS
    for what in ("slow reads", "failed writes", "refused posts", "drains"):
        assert EXERCISED[what] > 0, (what, dict(EXERCISED))


async def scenario(steps: Sequence[tuple[int, int, int]]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="qc-example-"))
    db = workdir / "chat.db"
    shutil.copy(template_db(), db)
    url = f"sqlite+aiosqlite:///{db}"
    bus = Bus()
    hubs: list[Hub] = []
    stores: list[FlakyStore] = []
    for n in range(2):
        settings_ = attrs.evolve(
            Settings.from_env(
                {"QUARTCHAT_DATABASE_URL": url, "QUARTCHAT_SERVER_ID": f"s{n}"}, env_file=None
            ),
            gap_timeout_s=0.02,
            position_check_s=0.05,
            room_idle_s=60.0,
        )
        store = FlakyStore(url)
        hub = Hub(settings_, store=store, broker=ChaosBroker(bus))  # type: ignore[arg-type]
        await hub.start()
        hubs.append(hub)
        stores.append(store)
    seats = [Seat(hub=i % 2) for i in range(6)]
    clients: list[Client] = []
    joins: dict[str, list[tuple[int | None, int | None]]] = defaultdict(list)
    counter = 0
    accepted: dict[str, int] = defaultdict(int)  # posts each connection's rooms took
    drained: list[int] = []
    # Everyone starts joined (on one of the two servers, in one of the rooms).
    opening = [(3, n, n) for n in range(len(seats))]
    try:
        for kind, a, b in [*opening, *steps]:
            seat = seats[a % len(seats)]
            hub = hubs[seat.hub]
            if kind in POSTS:  # post (sometimes a retry of an earlier client_msg_id)
                if seat.client is None or seat.room not in seat.client.conn.rooms:
                    continue
                if b % 4 == 0 and seat.posted:
                    cmid = seat.posted[b % len(seat.posted)]
                else:
                    counter += 1
                    cmid = f"k{counter}" if b % 3 else None
                    if cmid is not None:
                        seat.posted.append(cmid)
                try:
                    hub.submit(seat.room, Post(seat.client.conn, f"c{counter}", cmid))
                except ChatError:
                    pass  # refused (a full inbox): the socket would get an error frame
                else:
                    accepted[seat.client.conn.conn_id] += 1
            elif kind == 3:  # (re)connect and join, with any since_seq / history
                if seat.client is not None:
                    hub.disconnected(seat.client.conn)
                counter += 1
                seat.client = Client(f"u{a % len(seats)}", f"c{counter}")
                clients.append(seat.client)
                hub.connected(seat.client.conn)
                seat.room = ROOMS[b % 2]
                choice = b % 4
                since = (b // 4) % 12 if choice == 1 else None
                history = (b // 4) % 5 if choice == 2 else None
                seat.client.conn.rooms.add(seat.room)
                hub.submit(seat.room, Join(seat.client.conn, since_seq=since, history=history))
                joins[seat.client.conn.conn_id].append((since, history))
            elif kind == 4:  # leave (maybe during its replay), and maybe join again
                if seat.client is not None and seat.room in seat.client.conn.rooms:
                    seat.client.conn.rooms.discard(seat.room)
                    hub.submit(seat.room, Leave(seat.client.conn))
                    if b % 2:
                        seat.client.conn.rooms.add(seat.room)
                        hub.submit(seat.room, Join(seat.client.conn, since_seq=b % 7))
                        joins[seat.client.conn.conn_id].append((b % 7, None))
            elif kind in (5, 6) and bus.pending:  # the broker delivers one, any order
                handler, payload = bus.pending.pop(b % len(bus.pending))
                handler(payload)
                if b % 9 == 0:
                    handler(payload)  # delivered twice
            elif kind == 7 and bus.pending:  # the broker loses one
                bus.pending.pop(b % len(bus.pending))
            elif kind == 8:  # store reads start or stop failing
                stores[a % 2].failing = bool(b % 2)
            elif kind == 9:  # time passes
                await asyncio.sleep(0.001 * (b % 20))
            elif kind == 10:  # store reads become slow (a real wait) or fast again
                stores[a % 2].read_delay = (0.0, 0.002, 0.005, 0.01)[b % 4]
            elif kind == 11:  # store writes start or stop failing
                stores[a % 2].writes_fail = bool(b % 2)
            elif kind == 12 and b % 8 == 0 and not drained:  # a server drains; members move
                drained.append(seat.hub)
                await drain(hubs, seat.hub, seats, clients, accepted, joins)
                counter += len(seats)
        # Heal: the broker is quiet, the store answers; the position checks finish the job.
        for store in stores:  # (reads may stay slow)
            store.failing = store.writes_fail = False
        for handler, payload in bus.pending:
            handler(payload)
        bus.pending.clear()
        for hub in hubs:  # every accepted post written and acked
            for actor in list(hub.actors.values()):
                await actor.quiesce()
        stored = {room: await stores[0].after(room, 0, None, 10_000) for room in ROOMS}
        await settle(hubs, clients, stored)
        check(seats, clients, stored, joins)
        STATS.append(sum(len(v) for v in stored.values()))
        EXERCISED["refused posts"] += sum(
            1 for c in clients for e in c.socket.of("error") if e.get("action") == "message"
        )
    finally:
        for c in clients:
            await c.aclose()
        for hub in hubs:
            for c in clients:
                hub.disconnected(c.conn)
            await hub.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def drain(
    hubs: list[Hub],
    n: int,
    seats: list[Seat],
    clients: list[Client],
    accepted: dict[str, int],
    joins: dict[str, list[tuple[int | None, int | None]]],
) -> None:
    """Drain hub ``n``: every post its rooms accepted is answered (ack or error) before
    its sockets close with 1001; its members then reconnect to the other hub with
    ``since_seq`` = the last seq they got (or their ``joined.last_seq``)."""
    EXERCISED["drains"] += 1
    hub, other = hubs[n], hubs[1 - n]
    await hub.drain()
    for seat in seats:
        if seat.hub != n:
            continue
        old = seat.client
        seat.hub = 1 - n
        if old is None:
            continue
        if old.conn.open or old.socket.closed_with is not None:
            async with asyncio.timeout(5):
                await old.writer
            assert old.socket.closed_with == 1001
            answered = len(old.socket.of("ack")) + sum(
                1 for e in old.socket.of("error") if e.get("action") == "message"
            )
            assert answered == accepted[old.conn.conn_id], "every accepted post answered"
        hub.disconnected(old.conn)  # as the socket's end does
        since = None
        if seat.room in old.conn.rooms:
            runs = stream(old, seat.room)
            if runs:
                got = [m["seq"] for m in runs[-1][1:]]
                since = got[-1] if got else runs[-1][0]["last_seq"]
        new = Client(old.conn.sender_id, f"{old.conn.conn_id}-moved")
        clients.append(new)
        seat.client = new
        other.connected(new.conn)
        new.conn.rooms.add(seat.room)
        other.submit(seat.room, Join(new.conn, since_seq=since))
        joins[new.conn.conn_id].append((since, None))


def stream(client: Client, room: str) -> list[list[dict[str, Any]]]:
    """The client's frames of ``room`` split into memberships: each starts at a
    ``joined`` (a repeated join answers ``joined`` again without a new start)."""
    runs: list[list[dict[str, Any]]] = []
    member = False
    for frame in client.socket.frames:
        if frame.get("room_id") != room:
            continue
        if frame["type"] == "joined" and not member:
            runs.append([frame])
            member = True
        elif frame["type"] == "left":
            member = False
        elif frame["type"] == "message" and runs:
            runs[-1].append(frame)
    return runs


async def settle(
    hubs: list[Hub], clients: list[Client], stored: dict[str, list[StoredMessage]]
) -> None:
    """Wait until every member still joined has caught up with the store."""

    async def caught_up() -> bool:
        for room in ROOMS:
            newest = stored[room][-1].seq if stored[room] else 0
            for hub in hubs:
                actor = hub.actors.get(room)
                if actor is None:
                    continue
                if (actor.delivered or 0) < newest:
                    return False
                for member in actor.members:
                    if member.cursor < newest or not member.live:
                        return False
        return True

    async with asyncio.timeout(20):
        while not await caught_up():
            await asyncio.sleep(0.02)
    for hub in hubs:
        for actor in list(hub.actors.values()):
            await actor.quiesce()
    async with asyncio.timeout(10):  # every frame queued reaches its fake socket
        while any(c.conn.queued for c in clients if c.conn.open):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)


def first_expected(last_seq: int, since: int | None, history: int | None) -> tuple[int, int]:
    """Bounds of the first seq a membership may get, from its joined.last_seq and request."""
    if since is not None:
        if since < last_seq:
            return since + 1, since + 1
        return last_seq + 1, since + 1  # ahead: up to it is skipped, unless beyond the room
    if history:
        start = max(1, last_seq - history + 1) if last_seq else 1
        return start, start
    return last_seq + 1, last_seq + 1


def check(
    seats: list[Seat],
    clients: list[Client],
    stored: dict[str, list[StoredMessage]],
    joins: dict[str, list[tuple[int | None, int | None]]],
) -> None:
    for room in ROOMS:
        rows = stored[room]
        seqs = [r.seq for r in rows]
        assert seqs == list(range(1, len(rows) + 1)), "the store has no holes"
        keys = [(r.sender_id, r.client_msg_id) for r in rows if r.client_msg_id is not None]
        assert len(keys) == len(set(keys)), "a retried client_msg_id is stored once"
        by_seq = {r.seq: r for r in rows}
        for client in clients:
            requests = joins[client.conn.conn_id]
            runs = stream(client, room)
            if len(runs) < len(requests):
                # A leave before the room's start-up read cancels the joins still waiting
                # for it (answered with not_joined, no joined frame): those are the first.
                requests = requests[len(requests) - len(runs) :]
            for n, run in enumerate(runs):
                joined, messages = run[0], run[1:]
                got = [m["seq"] for m in messages]
                assert got == sorted(set(got)), f"strictly increasing: {got}"
                for m in messages:
                    assert m["content"] == by_seq[m["seq"]].content
                if got:
                    # Contiguous from where it started: nothing skipped in between.
                    assert got == list(range(got[0], got[-1] + 1)), f"a gap: {got}"
                    lo, hi = first_expected(joined["last_seq"], *requests[n])
                    assert lo <= got[0] <= hi, (
                        f"starts at {got[0]}, not in [{lo}, {hi}] "
                        f"for {requests[n]}, joined {joined}"
                    )
        for seat in seats:
            client = seat.client
            if client is None or seat.room != room or room not in client.conn.rooms:
                continue
            runs = stream(client, room)
            assert runs, "a member got its joined frame"
            joined, messages = runs[-1][0], runs[-1][1:]
            got = [m["seq"] for m in messages]
            lo, hi = first_expected(joined["last_seq"], *joins[client.conn.conn_id][-1])
            if lo <= len(rows):
                # Caught up, unless its since_seq ahead of the room was taken as real
                # (the room reached it before the join's check read): nothing to get.
                nothing_due = not got and hi > len(rows)
                assert nothing_due or (got and got[-1] == len(rows)), (
                    f"caught up: {got[-3:]} vs {len(rows)}, start bounds [{lo}, {hi}]"
                )
        acked = set()
        for client in clients:
            for ack in client.socket.of("ack"):
                if ack["room_id"] == room:
                    row = by_seq[ack["seq"]]
                    assert row.id == ack["id"] and row.client_msg_id == ack["client_msg_id"]
                    acked.add(ack["client_msg_id"])
        stored_ids = {r.client_msg_id for r in rows}
        for client in clients:
            for error in client.socket.of("error"):
                if error.get("action") == "message" and error.get("room_id") == room:
                    assert error["code"] == "unavailable", error  # a failed write: retry later
                cmid = error.get("client_msg_id")
                if error.get("room_id") == room and cmid is not None and cmid not in acked:
                    assert cmid not in stored_ids, f"{cmid} refused ({error}) but stored"
