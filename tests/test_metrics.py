"""Every metric group moves as it should, driven through the real code.

Metrics are process-global (one module, one registry), so each test reads
before/after deltas with ``REGISTRY.get_sample_value``; the tests never
reset anything. The last tests check prometheus-client's multiprocess mode
with real processes (several writers, one reader) and the launcher's set-up
of ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError

from quartchat import exposition, metrics
from quartchat.app import create_app
from quartchat.config import Settings
from quartchat.hub import Hub
from quartchat.room import Join, Leave, Post
from quartchat.server import reset_metrics_dir, sample_queues, sample_registry
from quartchat.store import StoreError
from quartchat.store.database import DatabaseStore

from .conftest import wait_for
from .fakes import Client
from .redis_util import RedisServer, unique_prefix
from .rooms import join as join_room
from .rooms import payload_of, stored_elsewhere

ROOM = "metrics-room"
ROOT = Path(__file__).resolve().parent.parent


def value(name: str, **labels: str) -> float:
    """A sample's current value in this process (0 when the series does not exist yet)."""
    got = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if got is None else got


class Deltas:
    """Values of samples relative to when this object was made."""

    def __init__(self, *samples: tuple[str, dict[str, str]] | str) -> None:
        self._before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for sample in samples:
            name, labels = (sample, {}) if isinstance(sample, str) else sample
            self._before[(name, tuple(sorted(labels.items())))] = value(name, **labels)

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self._before, f"{key} was not snapshotted"
        return value(name, **labels) - self._before[key]


def q(name: str) -> str:
    return f"quartchat_{name}"


# ---- fixtures -------------------------------------------------------------------------


class GatedStore(DatabaseStore):
    """The real store; inserts can be held back or made to fail."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.down = False

    async def append(self, room_id: str, posts: Any) -> Any:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreError("injected: database unreachable")
        return await super().append(room_id, posts)


@pytest.fixture
def hub_factory(make_hub: Callable[..., Any]) -> Callable[..., Any]:
    return functools.partial(make_hub, store_cls=GatedStore)


async def join(hub: Hub, c: Client, room: str = ROOM, **kw: Any) -> None:
    await join_room(hub, c, room, **kw)


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[Quart]:
    application = create_app(make_settings(rate_per_s=1000, rate_burst=1000))
    async with application.test_app():
        yield application


class WS:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return orjson.loads(await self.ws.receive())  # type: ignore[no-any-return]

    async def expect(self, type_: str) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == type_, frame
        return frame


def connect(app: Quart, sender: str = "alice") -> Any:
    return app.test_client().websocket(f"/chat?sender_id={sender}")


async def _remote(hub: Hub, count: int) -> list[bytes]:
    """``count`` messages another server stored; their broker payloads, which the
    test delivers (or not) itself."""
    return [payload_of(row) for row in await stored_elsewhere(hub, count, ROOM)]


# ---- connections ----------------------------------------------------------------------


async def test_connections_open_opened_closed_and_refused(app: Quart) -> None:
    d = Deltas(
        q("connections_open"),
        q("connections_opened_total"),
        (q("connections_closed_total"), {"code": "1000"}),
        (q("handshakes_refused_total"), {"status": "400"}),
    )
    async with connect(app, "a") as ra, connect(app, "b") as rb:
        await WS(ra).expect("welcome")
        await WS(rb).expect("welcome")
        assert d(q("connections_open")) == 2
        assert d(q("connections_opened_total")) == 2
        assert d(q("connections_closed_total"), code="1000") == 0
    # The client went away: the route's cleanup runs as its handler ends.
    await wait_for(lambda: d(q("connections_open")) == 0)
    await wait_for(lambda: d(q("connections_closed_total"), code="1000") == 2)
    assert d(q("connections_opened_total")) == 2
    with pytest.raises(WebsocketResponseError):
        async with app.test_client().websocket("/chat") as raw:
            await raw.receive()
    assert d(q("handshakes_refused_total"), status="400") == 1
    assert d(q("connections_opened_total")) == 2, "a refused handshake is no connection"


# ---- frames and errors ----------------------------------------------------------------


async def test_frames_by_action_and_errors_by_code(app: Quart) -> None:
    actions = ["join", "message", "history", "ping", "leave"]
    codes = ["invalid_json", "unknown_action", "not_joined", "invalid_field"]
    d = Deltas(
        *((q("frames_received_total"), {"action": a}) for a in actions),
        *((q("errors_sent_total"), {"code": c}) for c in codes),
    )
    async with connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "r"})
        await ws.expect("joined")
        await ws.send({"action": "message", "room_id": "r", "content": "hi"})
        assert {(await ws.recv())["type"], (await ws.recv())["type"]} == {"ack", "message"}
        await ws.send({"action": "history", "room_id": "r"})
        await ws.expect("history")
        await ws.send({"action": "ping"})
        await ws.expect("pong")
        await ws.send({"action": "leave", "room_id": "r"})
        await ws.expect("left")
        await ws.send({"action": "leave", "room_id": "r"})  # a well-formed leave: not_joined
        assert (await ws.expect("error"))["code"] == "not_joined"
        await ws.send("this is not json")
        assert (await ws.expect("error"))["code"] == "invalid_json"
        await ws.send({"action": "dance"})
        assert (await ws.expect("error"))["code"] == "unknown_action"
        await ws.send({"action": "message", "room_id": "r", "content": ""})
        assert (await ws.expect("error"))["code"] == "invalid_field"
    assert {a: d(q("frames_received_total"), action=a) for a in actions} == {
        "join": 1,
        "message": 1,
        "history": 1,
        "ping": 1,
        "leave": 2,
    }
    assert {c: d(q("errors_sent_total"), code=c) for c in codes} == dict.fromkeys(codes, 1)


# ---- messages and delivery latency ----------------------------------------------------


async def test_messages_stored_published_delivered_and_latency(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    await join(hub, bob)
    lat = q("delivery_latency_seconds")
    d = Deltas(
        q("messages_stored_total"),
        q("messages_published_total"),
        q("messages_delivered_total"),
        f"{lat}_count",
        f"{lat}_sum",
        (f"{lat}_bucket", {"le": "2.5"}),
    )
    for i in range(5):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 5)
    await bob.socket.next_of("message", 5)
    await alice.socket.next_of("message", 5)
    assert d(q("messages_stored_total")) == 5
    assert d(q("messages_published_total")) == 5
    assert d(q("messages_delivered_total")) == 10, "two local members, five messages"
    assert d(f"{lat}_count") == 5, "one observation per message, not per socket"
    assert d(f"{lat}_bucket", le="2.5") == 5
    assert 0 <= d(f"{lat}_sum") < 5 * 2.5


# ---- store ----------------------------------------------------------------------------


async def test_store_write_latency_batch_size_and_errors(hub_factory: Any) -> None:
    hub, client = await hub_factory(batch_max=100)
    store: GatedStore = hub.store  # type: ignore[assignment]
    alice = client("alice")
    await join(hub, alice)
    w, b = q("store_write_seconds"), q("store_batch_size")
    d = Deltas(
        f"{w}_count",
        f"{w}_sum",
        f"{b}_count",
        f"{b}_sum",
        (f"{b}_bucket", {"le": "1.0"}),
        (f"{b}_bucket", {"le": "10.0"}),
        (q("store_errors_total"), {"op": "insert"}),
    )
    # The first write is held for 0.2 s; nine posts queue behind it and go as one batch.
    store.gate = asyncio.Event()
    hub.submit(ROOM, Post(alice.conn, "first", None))
    await asyncio.wait_for(store.entered.wait(), 5)
    for i in range(9):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await wait_for(lambda: hub.actors[ROOM]._inbox.empty())
    await asyncio.sleep(0.2)
    store.gate.set()
    await alice.socket.next_of("ack", 10)
    assert d(f"{w}_count") == 2 and d(f"{b}_count") == 2
    assert d(f"{b}_sum") == 10
    assert d(f"{b}_bucket", le="1.0") == 1 and d(f"{b}_bucket", le="10.0") == 2
    assert d(f"{w}_sum") >= 0.2, "the held write took at least 0.2 s"
    # A failed write is counted as an error, not as a write.
    store.down = True
    hub.submit(ROOM, Post(alice.conn, "lost", None))
    err = await alice.socket.next_of("error")
    assert err[-1]["code"] == "unavailable"
    assert d(q("store_errors_total"), op="insert") == 1
    assert d(f"{w}_count") == 2 and d(f"{b}_sum") == 10


# ---- broker ---------------------------------------------------------------------------


async def test_broker_up_reconnects_and_resubscribes(hub_factory: Any, tmp_path: Path) -> None:
    # The memory broker is always up.
    metrics.BROKER_UP.set(0)
    await hub_factory()
    assert value(q("broker_up")) == 1

    # Redis: a throwaway server of this test's own, killed and started again.
    server = RedisServer(tmp_path).start()
    try:
        from quartchat.broker.redis import RedisBroker

        broker = RedisBroker(server.url, prefix=unique_prefix(), server_id="metrics")
        hub, client = await hub_factory(broker=broker)
        assert value(q("broker_up")) == 1
        alice = client("alice")
        await join(hub, alice)  # one room channel subscribed
        await join(hub, alice, room="other")  # and a second
        d = Deltas(q("broker_reconnects_total"), q("broker_resubscribes_total"))
        server.kill()
        await wait_for(lambda: value(q("broker_up")) == 0, timeout=10)
        assert d(q("broker_reconnects_total")) == 0
        server.start()
        await wait_for(lambda: value(q("broker_up")) == 1, timeout=15)
        assert d(q("broker_reconnects_total")) == 1
        assert d(q("broker_resubscribes_total")) == 2, "both rooms resubscribed"
        await hub.stop()
    finally:
        server.kill()


# ---- reorder buffer, gap fills, skipped seqs ------------------------------------------


async def test_reorder_holds_gap_fills_and_skipped_seqs(hub_factory: Any, sync_sql: Any) -> None:
    hub, client = await hub_factory(gap_timeout_s=0.05, position_check_s=60)
    bob = client("bob")
    await join(hub, bob)
    actor = hub.actors[ROOM]
    d = Deltas(q("reorder_holds_total"), q("gap_fills_total"), q("skipped_seqs_total"))
    # Out of order from the broker: 3 is held until 1 and 2 arrive.
    first = await _remote(hub, 3)
    for seq in (3, 1, 2):
        actor.on_broker(first[seq - 1])
    await bob.socket.next_of("message", 3)
    assert (d(q("reorder_holds_total")), d(q("gap_fills_total"))) == (1, 0)
    # 4..6 are stored but only 6 is announced: 4 and 5 are read from the store.
    second = await _remote(hub, 3)
    actor.on_broker(second[2])
    await bob.socket.next_of("message", 6)
    assert (d(q("reorder_holds_total")), d(q("gap_fills_total"))) == (2, 2)
    assert d(q("skipped_seqs_total")) == 0
    # 7 was deleted from the store by an operator: a complete read passes over it.
    third = await _remote(hub, 2)
    await sync_sql(f"DELETE FROM messages WHERE room_id = '{ROOM}' AND seq = 7")
    actor.on_broker(third[1])
    got = await bob.socket.next_of("message", 7)
    assert [m["seq"] for m in got] == [1, 2, 3, 4, 5, 6, 8]
    assert d(q("skipped_seqs_total")) == 1
    assert (d(q("reorder_holds_total")), d(q("gap_fills_total"))) == (3, 2)


# ---- replay ---------------------------------------------------------------------------


async def test_replayed_messages_since_seq_and_history(hub_factory: Any) -> None:
    hub, client = await hub_factory()
    alice = client("alice")
    await join(hub, alice)
    for i in range(10):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 10)
    d = Deltas(q("replayed_messages_total"))
    bob = client("bob")
    await join(hub, bob, since_seq=4)
    await bob.socket.next_of("message", 6)
    await wait_for(lambda: d(q("replayed_messages_total")) == 6)
    carol = client("carol")
    await join(hub, carol, history=3)
    await carol.socket.next_of("message", 3)
    await wait_for(lambda: d(q("replayed_messages_total")) == 9)
    # Joining at the newest seq replays nothing.
    dave = client("dave")
    await join(hub, dave, since_seq=10)
    await hub.actors[ROOM].settle()
    assert d(q("replayed_messages_total")) == 9


# ---- slow consumers -------------------------------------------------------------------


async def test_slow_consumer_close(hub_factory: Any) -> None:
    hub, client = await hub_factory(outbound_queue=20)
    fast, slow = client("fast", queue_size=20), client("slow", queue_size=20, stalled=True)
    d = Deltas(q("slow_consumer_closes_total"), (q("connections_closed_total"), {"code": "4008"}))
    await join(hub, fast)
    slow.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(slow.conn))  # the stalled socket never reads its joined frame
    for i in range(40):
        hub.submit(ROOM, Post(fast.conn, f"m{i}", None))
        if i % 10 == 9:
            await fast.socket.next_of("message", i + 1)
    assert slow.conn.close_code == 4008
    assert d(q("slow_consumer_closes_total")) == 1, "closed once, however many frames overflowed"
    hub.disconnected(slow.conn)  # what the route does when the socket is gone
    assert d(q("connections_closed_total"), code="4008") == 1


# ---- rooms and queues -----------------------------------------------------------------


async def test_active_rooms_inbox_depth_and_outbound_queues(hub_factory: Any) -> None:
    d = Deltas(
        q("active_rooms"),
        q("inbox_depth_count"),
        q("inbox_depth_sum"),
        (q("inbox_depth_bucket"), {"le": "10.0"}),
        (q("inbox_depth_bucket"), {"le": "100.0"}),
    )
    hub, client = await hub_factory(room_idle_s=0.1)
    alice = client("alice")
    slow = client("slow", stalled=True)  # never reads: its frames pile up in its queue
    await join(hub, alice)
    await join(hub, alice, room="second")
    assert d(q("active_rooms")) == 2
    slow.conn.rooms.add(ROOM)
    hub.submit(ROOM, Join(slow.conn))
    # Fifty posts queued at once: the actor sees an inbox of 49, 48, ... 0.
    for i in range(50):
        hub.submit(ROOM, Post(alice.conn, f"m{i}", None))
    await alice.socket.next_of("ack", 50)
    await alice.socket.next_of("message", 50)
    assert d(q("inbox_depth_count")) >= 50
    assert d(q("inbox_depth_sum")) >= sum(range(50))
    assert d(q("inbox_depth_bucket"), le="100.0") - d(q("inbox_depth_bucket"), le="10.0") >= 39

    # Another stalled socket, with five frames waiting.
    slow2 = client("slow2", stalled=True)
    slow2.conn.rooms.add("second")
    hub.submit("second", Join(slow2.conn))
    for i in range(5):
        hub.submit("second", Post(alice.conn, f"s{i}", None))
    await alice.socket.next_of("ack", 55)
    await wait_for(lambda: slow.conn.queued == 50 and slow2.conn.queued == 5)
    sample_queues(hub)
    assert value(q("outbound_queue_max")) == 50
    assert value(q("outbound_queued_frames")) == 55 + alice.conn.queued
    hub.disconnected(slow.conn)
    sample_queues(hub)
    assert value(q("outbound_queue_max")) == 5
    hub.disconnected(slow2.conn)

    # Rooms without members retire: the gauge comes back down.
    for room in (ROOM, "second"):
        alice.conn.rooms.discard(room)
        hub.submit(room, Leave(alice.conn))
    await wait_for(lambda: not hub.actors)
    await wait_for(lambda: d(q("active_rooms")) == 0)


async def test_registry_gauges_count_tasks_threads_connections_and_rooms(hub_factory: Any) -> None:
    hub, client = await hub_factory(room_idle_s=0.1)
    sample_registry(hub)
    idle_tasks = value(q("asyncio_tasks"))
    assert idle_tasks == len(asyncio.all_tasks()) > 0
    assert value(q("threads")) >= 1
    assert value(q("hub_connections")) == value(q("hub_rooms")) == 0
    alice, bob = client("alice"), client("bob")
    await join(hub, alice)
    await join(hub, bob, room="second")
    sample_registry(hub)
    assert value(q("hub_connections")) == 2
    assert value(q("hub_rooms")) == 2
    assert value(q("asyncio_tasks")) > idle_tasks  # two writers and the rooms' tasks
    # Gone: disconnected, writers stopped, rooms retired and their tasks finished.
    for c in (alice, bob):
        hub.disconnected(c.conn)
        await c.aclose()
    await wait_for(lambda: not hub.actors and hub.retiring == 0)
    sample_registry(hub)
    assert value(q("hub_connections")) == value(q("hub_rooms")) == value(q("retiring_rooms")) == 0
    await wait_for(lambda: len(asyncio.all_tasks()) <= idle_tasks)
    sample_registry(hub)
    assert value(q("asyncio_tasks")) <= idle_tasks


# ---- rate limit -----------------------------------------------------------------------


async def test_rate_limited_frames(make_settings: Callable[..., Settings]) -> None:
    d = Deltas(
        q("rate_limited_frames_total"),
        (q("errors_sent_total"), {"code": "rate_limited"}),
        (q("frames_received_total"), {"action": "ping"}),
    )
    app = create_app(make_settings(rate_per_s=1, rate_burst=3))
    async with app.test_app(), connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        for _ in range(6):
            await ws.send({"action": "ping"})
        answers = [(await ws.recv())["type"] for _ in range(6)]
    limited = answers.count("error")
    assert limited >= 2, answers
    assert d(q("rate_limited_frames_total")) == limited
    assert d(q("errors_sent_total"), code="rate_limited") == limited
    assert d(q("frames_received_total"), action="ping") == 6 - limited, (
        "refused frames are not counted"
    )


# ---- drain ----------------------------------------------------------------------------


async def test_drain_duration_and_1001_closes(app: Quart) -> None:
    hub = app.extensions["quartchat"]
    d = Deltas(
        q("drain_seconds_count"),
        q("drain_seconds_sum"),
        (q("connections_closed_total"), {"code": "1001"}),
        q("connections_open"),
    )
    async with connect(app, "alice") as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        assert d(q("connections_open")) == 1
        drain = asyncio.create_task(hub.drain())
        with pytest.raises(WebsocketDisconnectError) as info:
            while True:
                await ws.recv()
        assert info.value.args[0] == 1001
        await drain
    await hub.drain()  # a second call is a no-op, and not a second drain
    assert d(q("drain_seconds_count")) == 1
    assert 0 <= d(q("drain_seconds_sum")) < 10
    await wait_for(lambda: d(q("connections_closed_total"), code="1001") == 1)
    assert d(q("connections_open")) == 0


# ---- exposition -----------------------------------------------------------------------


async def test_metrics_route_serves_every_metric(app: Quart) -> None:
    response = await app.test_client().get("/metrics")
    assert response.status_code == 200
    text = (await response.get_data()).decode()
    for name in metrics.__all__:
        metric = getattr(metrics, name)
        if hasattr(metric, "_name"):
            assert re.search(rf"^# TYPE {metric._name}(_total)? ", text, re.MULTILINE), name
            assert metric._name.startswith("quartchat_"), name
            assert not set(metric._labelnames) & {"room_id", "sender_id", "room", "sender"}


async def test_metrics_route_renders_off_the_event_loop(
    app: Quart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow render (many workers' files) does not stall the loop; values stay exact."""
    real = exposition.generate_latest
    render_threads: list[int] = []

    def slow_generate_latest(registry: Any) -> bytes:
        render_threads.append(threading.get_ident())
        time.sleep(0.5)  # stands in for summing every worker's files
        return real(registry)

    monkeypatch.setattr(exposition, "generate_latest", slow_generate_latest)
    stalls: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            stalls.append(time.monotonic() - before)

    client = app.test_client()
    for _ in range(2):  # the second scrape sees what changed after the first
        metrics.RATE_LIMITED.inc()
        expected = value("quartchat_rate_limited_frames_total")
        ticking = asyncio.create_task(ticker())
        try:
            response = await client.get("/metrics")
        finally:
            ticking.cancel()
            await asyncio.gather(ticking, return_exceptions=True)
        assert response.status_code == 200
        text = (await response.get_data()).decode()
        assert f"quartchat_rate_limited_frames_total {expected}" in text
    print(f"longest event-loop stall during a 0.5 s render: {max(stalls):.3f}s")
    assert max(stalls) < 0.25, f"the event loop stalled {max(stalls):.2f}s during a render"
    assert render_threads and threading.get_ident() not in render_threads


# ---- multiprocess mode ----------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import os, sys
    from quartchat import exposition, metrics
    assert exposition.MULTIPROCESS
    metrics.CONNECTIONS_OPENED.inc(int(sys.argv[1]))
    metrics.CONNECTIONS_OPEN.inc(int(sys.argv[1]))
    metrics.BROKER_UP.set(int(sys.argv[2]))
    metrics.ERRORS_SENT.labels(code="rate_limited").inc()
    print(os.getpid())
""")

_READER = textwrap.dedent("""
    import json, os
    from prometheus_client import multiprocess
    from prometheus_client.parser import text_string_to_metric_families
    from quartchat import exposition, metrics
    # This reader defined the metrics too (broker_up 0): it plays a dead worker.
    multiprocess.mark_process_dead(os.getpid())
    body, _ = exposition.render()
    print(json.dumps({s.name + json.dumps(s.labels, sort_keys=True): s.value
                      for f in text_string_to_metric_families(body.decode()) for s in f.samples}))
""")


def _python(code: str, *args: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_multiprocess_mode_sums_every_process_and_forgets_dead_gauges(tmp_path: Path) -> None:
    from prometheus_client import multiprocess

    path = tmp_path / "does-not-exist-yet"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    pid1 = int(_python(_WRITER, "3", "1", env=env))
    pid2 = int(_python(_WRITER, "4", "0", env=env))
    read = json.loads(_python(_READER, env=env))
    assert read["quartchat_connections_opened_total{}"] == 7
    assert read["quartchat_connections_open{}"] == 7, "livesum: one series for the host"
    assert read["quartchat_broker_up{}"] == 0, "livemin: the worst worker"
    assert read['quartchat_errors_sent_total{"code": "rate_limited"}'] == 2
    assert not any('"pid"' in key for key in read)
    multiprocess.mark_process_dead(pid2, str(path))  # what the launcher does on exit
    read = json.loads(_python(_READER, env=env))
    assert read["quartchat_connections_open{}"] == 3
    assert read["quartchat_broker_up{}"] == 1
    assert read["quartchat_connections_opened_total{}"] == 7, "counters keep a dead worker's counts"
    assert {p.name for p in path.glob("*.db")} >= {f"counter_{pid1}.db", f"counter_{pid2}.db"}


def test_launcher_process_never_loads_prometheus_client() -> None:
    code = (
        "import sys, quartchat.cli, quartchat.launcher, quartchat.server; "
        "print('prometheus_client' in sys.modules)"
    )
    assert _python(code, env=dict(os.environ)) == "False"


def test_launcher_exports_a_fresh_dir_or_empties_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quartchat import launcher

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    path, lock = launcher._metrics_dir()
    try:
        assert lock is not None and os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
        assert Path(path).is_dir() and not list(Path(path).glob("*.db"))
        # Another launcher's sweep leaves a live launcher's directory alone...
        launcher._sweep_orphaned_dirs()
        assert Path(path).is_dir()
    finally:
        os.close(lock)  # ...and removes it once its launcher is gone (SIGKILL skips cleanup)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # set by _metrics_dir itself
    launcher._sweep_orphaned_dirs()
    assert not Path(path).exists()

    users = tmp_path / "prom"
    users.mkdir()
    (users / "counter_12345.db").write_bytes(b"stale")
    (users / "gauge_livesum_12345.db").write_bytes(b"stale")
    (users / "README").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(users))
    path, lock = launcher._metrics_dir()
    assert (path, lock) == (str(users), None)
    assert sorted(p.name for p in users.iterdir()) == ["README"]

    # A lone process keeps its own files when it already defined its metrics.
    (users / "counter_12345.db").write_bytes(b"stale")
    (users / f"counter_{os.getpid()}.db").write_bytes(b"mine")
    reset_metrics_dir(str(users), keep_pid=os.getpid())
    assert sorted(p.name for p in users.iterdir()) == ["README", f"counter_{os.getpid()}.db"]


def test_single_process_with_a_multiproc_dir_starts_clean(tmp_path: Path) -> None:
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from .servers import ServerProcess

    path = tmp_path / "prom"
    path.mkdir()
    stale = MmapedDict(str(path / "counter_999999.db"))  # a previous run's worker
    name = q("connections_opened")
    stale.write_value(mmap_key(name, name + "_total", [], [], "x"), 100_000.0, 0.0)
    stale.close()
    server = ServerProcess(
        tmp_path,
        {
            "PROMETHEUS_MULTIPROC_DIR": str(path),
            "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/c.db",
            "QUARTCHAT_BROKER_URL": "memory://",
        },
        workers=1,
    )
    try:
        server.start()
        assert server.proc is not None
        assert not (path / "counter_999999.db").exists()
        assert (path / f"counter_{server.proc.pid}.db").exists(), "multiprocess mode is in use"
        with urllib.request.urlopen(server.http + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(r"^quartchat_connections_opened_total 0\.0$", text, re.MULTILINE), text
        assert re.search(r"^quartchat_broker_up 1\.0$", text, re.MULTILINE), text
    finally:
        server.stop()
