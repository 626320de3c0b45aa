"""End-to-end on the embedded default: a real `quartchat serve` process, real clients."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import urllib.request
from pathlib import Path

import pytest
import websockets

from quartchat.client import ChatClient as ReconnectingClient

from .servers import ChatClient, ServerProcess, free_port


def stored(db: Path) -> dict[tuple[str, int], str]:
    with sqlite3.connect(db) as conn:
        return {(r, s): i for r, s, i in conn.execute("SELECT room_id, seq, id FROM messages")}


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    servers: list[ServerProcess] = []

    def make() -> ServerProcess:
        s = ServerProcess(
            tmp_path,
            {
                "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db",
                "QUARTCHAT_RATE_PER_S": "0",
            },
        )
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()


async def chatter(client: ChatClient, room: str, stop: asyncio.Event) -> int:
    """Post as fast as acks allow (at most 20 in flight) until stopped or closed."""
    sent = 0
    try:
        while not stop.is_set() and not client.closed:
            if sent - len(client.of("ack")) - len(client.of("error")) < 20:
                await client.send(
                    {
                        "action": "message",
                        "room_id": room,
                        "content": f"{client.sender} {sent}",
                        "client_msg_id": f"{client.sender}-{sent}",
                    }
                )
                sent += 1
            else:
                await asyncio.sleep(0.002)
    except websockets.ConnectionClosed:
        pass  # the socket closed under us: that is the point of the test
    return sent


@pytest.mark.parametrize("group", [False, True], ids=["sigterm-process", "sigterm-group"])
async def test_sigterm_under_traffic_loses_no_acked_message(
    server, tmp_path: Path, group: bool
) -> None:  # type: ignore[no-untyped-def]
    srv = server()
    clients = [await ChatClient(srv.url, f"user{i}").connect() for i in range(6)]
    rooms = ["alpha", "beta"]
    for i, c in enumerate(clients):
        await c.join(rooms[i % 2])
    stop = asyncio.Event()
    tasks = [asyncio.create_task(chatter(c, rooms[i % 2], stop)) for i, c in enumerate(clients)]
    await clients[0].wait_for(lambda: len(clients[0].of("ack")) >= 50)
    srv.signal(signal.SIGTERM, group=group)
    sent = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for c in clients:
        await c.wait_for(lambda c=c: c.closed, timeout=20)
    assert srv.wait(30) == 0, srv.log()

    in_db = stored(tmp_path / "chat.db")
    acked = [(a["room_id"], a["seq"], a["id"]) for c in clients for a in c.of("ack")]
    missing = [a for a in acked if in_db.get((a[0], a[1])) != a[2]]
    print(f"sent={sum(sent)} acked={len(acked)} stored={len(in_db)} missing={len(missing)}")
    assert len(acked) >= 50
    assert missing == []
    codes = [c.close_code for c in clients]
    assert codes == [1001] * len(clients), f"close codes {codes}"
    # Every member of a room saw the same gap-free, duplicate-free sequence.
    for room in rooms:
        members = [c for i, c in enumerate(clients) if rooms[i % 2] == room]
        seqs = [[m["seq"] for m in c.of("message", room)] for c in members]
        for s in seqs:
            assert s == list(range(1, len(s) + 1))


async def test_history_survives_a_restart(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server()
    alice = await ChatClient(srv.url, "alice").connect()
    await alice.join("room101")
    for i in range(5):
        await alice.send({"action": "message", "room_id": "room101", "content": f"m{i} 🎉"})
    await alice.wait_for(lambda: len(alice.of("ack")) == 5)
    srv.signal(signal.SIGTERM)
    await alice.wait_for(lambda: alice.closed, timeout=20)
    assert alice.close_code == 1001
    assert srv.wait(30) == 0

    srv2 = server()
    bob = await ChatClient(srv2.url, "bob").connect()
    joined = await bob.join("room101", since_seq=2)
    assert joined["last_seq"] == 5
    await bob.wait_for(lambda: len(bob.of("message")) == 3)
    assert [m["content"] for m in bob.of("message")] == ["m2 🎉", "m3 🎉", "m4 🎉"]
    page = srv2.http_get("/api/rooms/room101/messages")
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4, 5]
    await bob.send({"action": "message", "room_id": "room101", "content": "after"})
    await bob.wait_for(lambda: len(bob.of("ack")) == 1)
    assert bob.of("ack")[0]["seq"] == 6
    await bob.close()


async def test_oversized_frame_is_refused_without_a_reset(server) -> None:  # type: ignore[no-untyped-def]
    srv = server()
    client = await ChatClient(srv.url, "big").connect()
    await client.join("r")
    # Over max_content but within the frame limit: a protocol error, socket open.
    await client.send({"action": "message", "room_id": "r", "content": "x" * 5000})
    await client.wait_for(lambda: bool(client.of("error")))
    assert client.of("error")[0]["code"] == "too_large"
    # Beyond the frame limit (64 KiB): `too_large` too, not a reset, socket still open.
    await client.send({"action": "message", "room_id": "r", "content": "x" * 200_000})
    await client.wait_for(lambda: len(client.of("error")) == 2)
    assert client.of("error")[1]["code"] == "too_large"
    await client.send({"action": "ping"})
    await client.wait_for(lambda: bool(client.of("pong")))
    await client.close()


@pytest.mark.parametrize("fast", ["true", "false"])
async def test_fast_and_plain_write_paths_deliver_the_same(tmp_path: Path, fast: str) -> None:
    srv = ServerProcess(
        tmp_path,
        {
            "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/f.db",
            "QUARTCHAT_RATE_PER_S": "0",
            "QUARTCHAT_FAST_WRITES": fast,
        },
    ).start()
    try:
        a = await ChatClient(srv.url, "a").connect()
        b = await ChatClient(srv.url, "b").connect()
        await a.join("r")
        await b.join("r")
        for i in range(300):  # a burst, so frames queue up and go out in batches
            await a.send({"action": "message", "room_id": "r", "content": f"m{i} ✓"})
        await b.wait_for(lambda: len(b.of("message")) == 300)
        assert [m["content"] for m in b.of("message")] == [f"m{i} ✓" for i in range(300)]
        assert [m["seq"] for m in b.of("message")] == list(range(1, 301))
        srv.signal(signal.SIGTERM)
        await b.wait_for(lambda: b.closed, timeout=20)
        assert b.close_code == 1001
    finally:
        srv.stop()


async def test_the_python_client_rides_a_graceful_restart(tmp_path: Path) -> None:
    """quartchat.client through SIGTERM (1001) and a restart on the same port: every post
    acked and stored once, the reader sees every seq once, in order."""
    port = free_port()
    env = {
        "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db",
        "QUARTCHAT_RATE_PER_S": "0",
    }
    srv = ServerProcess(tmp_path, env, port=port).start()
    seen: list[dict] = []  # type: ignore[type-arg]
    try:
        reader = await ReconnectingClient(
            srv.url, sender_id="reader", on_message=seen.append, backoff_max=0.5
        ).start()
        writer = await ReconnectingClient(srv.url, sender_id="writer", backoff_max=0.5).start()
        await reader.join("r")
        await writer.join("r")
        posts = [writer.post("r", f"m{i}") for i in range(100)]
        await writer.wait_for(lambda: sum(p.state == "sent" for p in posts) >= 20)
        srv.signal(signal.SIGTERM)
        # Wait off the event loop: the clients must read the 1001 while the server drains
        # (a blocking wait left it unread in the socket, and the next post got a reset).
        assert await asyncio.to_thread(srv.wait, 30) == 0
        posts += [writer.post("r", f"m{i}") for i in range(100, 150)]  # while the server is down
        srv = ServerProcess(tmp_path, env, port=port).start()
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in posts)), 30)
        await reader.wait_for(lambda: len(seen) == 150, timeout=30)
        assert 1001 in writer.close_codes and 1001 in reader.close_codes
        assert [m["seq"] for m in seen] == list(range(1, 151))
        assert sorted(m["content"] for m in seen) == sorted(f"m{i}" for i in range(150))
        assert sorted(p.seq for p in posts) == list(range(1, 151))
        in_db = stored(tmp_path / "chat.db")
        assert len(in_db) == 150
        await reader.close()
        await writer.close()
    finally:
        srv.stop()


def frames_written(srv: ServerProcess) -> dict[str, float]:
    """``quartchat_frames_written_total`` by path, from the server's ``/metrics``."""
    with urllib.request.urlopen(srv.http + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(
        r'^quartchat_frames_written_total\{path="(\w+)"\} (\S+)$', text, re.MULTILINE
    )
    return {path: float(v) for path, v in found}


async def test_a_room_message_counts_one_direct_frame_per_member(server) -> None:  # type: ignore[no-untyped-def]
    """The room counts its fan-out's direct frames once per message for all its
    sockets (not each socket on its own): still one per member that got it."""
    srv = server()
    members = [await ChatClient(srv.url, name).connect() for name in ("a", "b", "c")]
    for m in members:
        await m.join("counted")
    await members[0].wait_for(lambda: len(members[0].of("presence")) >= 2)
    await asyncio.sleep(0.3)  # every frame of the joins written: the sockets are idle
    before = frames_written(srv)
    await members[0].send({"action": "message", "room_id": "counted", "content": "hi"})
    for m in members:
        await m.wait_for(lambda m=m: len(m.of("message")) == 1)
    await members[0].wait_for(lambda: len(members[0].of("ack")) == 1)
    after = frames_written(srv)
    assert after["direct"] - before["direct"] == 4, "three members' message frames and one ack"
    assert after.get("queued", 0) - before.get("queued", 0) == 0
    for m in members:
        await m.close()
