"""Fault tests: Redis restarted empty, the database cut, a server killed with -9.
Each asserts 0 acked messages lost, no duplicate, no order violation, and that
the service recovers. Faults come from processes of the test's own."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from .cluster import Cluster, eventually, summary
from .mysql import create_database, drop_database, with_host
from .proxy import ThreadedProxy
from .redis_util import RedisServer
from .servers import ChatClient, ReliableClient, check_room

ROOM = "faulty"


async def run_members(
    members: list[ReliableClient], count: int, rate: float, fault_after: float, fault: object
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    runs = [asyncio.create_task(m.run(count, rate=rate, deadline=deadline)) for m in members]
    await asyncio.sleep(fault_after)
    await asyncio.to_thread(fault)  # type: ignore[arg-type]
    await asyncio.gather(*runs)


async def settle_and_check(cluster: Cluster, members: list[ReliableClient], label: str) -> None:
    """Every member catches up to the newest stored seq; then guarantees 1-4 must hold."""
    stored = cluster.stored(ROOM)
    for m in members:
        await m.settle(max(stored))
    report = check_room(members, stored)
    print(f"{label}:", summary(report))
    assert_clean(report)


def assert_clean(report: dict[str, object]) -> None:
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["out_of_order"] == 0
    assert report["missing"] == 0
    assert report["acked"] == report["sent"] // 1 and report["acked"] == report["stored"]


async def test_redis_restarted_empty_mid_stream(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path).start()
    cluster = Cluster(tmp_path, redis_url=redis_server.url)
    try:
        a, b = cluster.start(2, workers=2)
        members = [ReliableClient([[a, b][i % 2].url], f"r{i}", ROOM) for i in range(4)]
        for m in members:
            await m.connect()
        await run_members(members, 60, 30, 1.0, redis_server.restart)
        await settle_and_check(cluster, members, "redis restart")
        # Recovered: ready again, presence re-listed, new posts flow across servers.
        assert a.http_get("/readyz")["status"] == "ready"
        await eventually(
            lambda: sorted(b.http_get(f"/api/rooms/{ROOM}/members")["members"]),
            ["r0", "r1", "r2", "r3"],
        )
        await members[0].run(61, rate=30, deadline=asyncio.get_running_loop().time() + 20)
        for m in members:
            await m.settle(max(cluster.stored(ROOM)))
        for m in members:
            await m.close()
    finally:
        cluster.close()
        redis_server.kill()


async def test_database_cut_mid_stream_and_restored(tmp_path: Path) -> None:
    database = create_database()
    proxy = ThreadedProxy("127.0.0.1", 3306).start()
    cluster = Cluster(tmp_path, database_url=database)
    try:
        from quartchat.migrate import upgrade

        upgrade(database)
        via_proxy = with_host(database, proxy.host, proxy.port)
        a, b = cluster.start(2, workers=1, database_url=via_proxy)
        members = [ReliableClient([[a, b][i % 2].url], f"d{i}", ROOM) for i in range(4)]
        for m in members:
            await m.connect()

        def outage() -> None:
            proxy.cut()
            time.sleep(2.0)
            proxy.restore()

        await run_members(members, 60, 30, 1.0, outage)
        await settle_and_check(cluster, members, "database cut")
        assert a.http_get("/readyz")["status"] == "ready"
        assert b.http_get("/readyz")["status"] == "ready"
        for m in members:
            await m.close()
    finally:
        cluster.close()
        proxy.close()
        drop_database(database)


async def test_server_killed_with_sigkill(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        a, b = cluster.start(2, workers=2)
        # Chatting members: half on a (they fail over to b), half on b.
        members = [
            ReliableClient([a.url, b.url] if i % 2 == 0 else [b.url], f"k{i}", ROOM)
            for i in range(4)
        ]
        for m in members:
            await m.connect()
        # Members that were only ever on a, and a watcher on b who sees them go.
        lurkers = [await ChatClient(a.url, f"lurker{i}").connect() for i in range(2)]
        for lurker in lurkers:
            await lurker.join(ROOM)
        watcher = await ChatClient(b.url, "watcher").connect()
        await watcher.join(ROOM)
        killed_at = 0.0

        def kill() -> None:
            nonlocal killed_at
            a.signal(signal.SIGKILL, group=True)  # the server and its workers, at once
            killed_at = time.monotonic()

        await run_members(members, 60, 30, 1.0, kill)
        await settle_and_check(cluster, members, "kill -9")
        assert sum(m.reconnects for m in members) >= 2, "a's members reconnected to b"

        def lurkers_gone() -> bool:
            left = {f["sender_id"] for f in watcher.of("presence") if f["event"] == "leave"}
            return {"lurker0", "lurker1"} <= left

        await watcher.wait_for(lurkers_gone, timeout=30)
        print(f"kill -9: dead server's members left after {time.monotonic() - killed_at:.1f}s")
        assert time.monotonic() - killed_at <= 30
        members_now = b.http_get(f"/api/rooms/{ROOM}/members")["members"]
        assert "lurker0" not in members_now and "watcher" in members_now
        for m in members:
            await m.close()
        await watcher.close()
    finally:
        cluster.close()


async def test_a_redis_outage_longer_than_the_dead_window_gives_no_false_leave(
    tmp_path: Path,
) -> None:
    """Redis frozen (SIGSTOP: its data kept) for 22 s, longer than presence's 20 s dead
    window, under two real servers with members of one room on each. When it resumes,
    every presence entry written before it is past its expiry: still no client hears a
    ``leave`` for a member that stayed connected; the one member who really left
    during the outage is announced; and a post afterwards reaches everyone."""
    redis_server = RedisServer(tmp_path).start()
    cluster = Cluster(tmp_path, redis_url=redis_server.url)
    clients: list[ChatClient] = []
    try:
        a, b = cluster.start(2, workers=1)
        for server, name in ((a, "alice"), (a, "bob"), (b, "carol"), (b, "dave"), (b, "eve")):
            c = await ChatClient(server.url, name).connect()
            await c.join(ROOM)
            clients.append(c)
        staying, eve = clients[:4], clients[4]
        everyone = sorted(c.sender for c in clients)
        await eventually(
            lambda: sorted(a.http_get(f"/api/rooms/{ROOM}/members")["members"]), everyone
        )
        redis_server.pause()
        paused_at = time.monotonic()
        await asyncio.sleep(3)
        await eve.close()  # a real leave, made while Redis is frozen
        await asyncio.sleep(22 - (time.monotonic() - paused_at))
        redis_server.resume()
        resumed_at = time.monotonic()

        def heard_eve_leave(c: ChatClient) -> bool:
            return any(
                f["event"] == "leave" and f["sender_id"] == "eve" for f in c.of("presence", ROOM)
            )

        # Her leave is applied once Redis answers again. Seen to take over 30 s after
        # the resume in some runs (the broker test of the same case only prints its
        # timing): bounded loosely here, and the time printed.
        for c in staying:
            await c.wait_for(lambda c=c: heard_eve_leave(c), timeout=75)
        print(f"eve's leave heard {time.monotonic() - resumed_at:.1f} s after the resume")
        # Give a reaper every chance to act wrongly: a full dead window after the resume.
        await asyncio.sleep(max(0.0, 22 - (time.monotonic() - resumed_at)))
        for c in staying:
            leaves = [f["sender_id"] for f in c.of("presence", ROOM) if f["event"] == "leave"]
            assert leaves == ["eve"], (c.sender, leaves)
            assert c.close_code is None, c.sender
        names = [c.sender for c in staying]
        for server in (a, b):
            assert sorted(server.http_get(f"/api/rooms/{ROOM}/members")["members"]) == sorted(names)
        await staying[0].send(
            {"action": "message", "room_id": ROOM, "content": "after", "client_msg_id": "x1"}
        )
        for c in staying:
            await c.wait_for(
                lambda c=c: any(f["content"] == "after" for f in c.of("message", ROOM)),
                timeout=10,
            )
    finally:
        for c in clients:
            await c.close()
        cluster.close()
        redis_server.kill()
