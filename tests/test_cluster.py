"""End-to-end across servers: two `quartchat serve` processes with two workers each,
sharing Redis (the shared server, or a Redis Cluster through redis+cluster://) and
MariaDB, with clients spread over both."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster, eventually, summary
from .servers import ChatClient, ReliableClient, check_room


@pytest.fixture(params=["redis", "redis-cluster"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    url = None
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    c = Cluster(tmp_path, redis_url=url)
    try:
        yield c
    finally:
        c.close()


async def test_room_spanning_servers_same_order_retries_and_reconnects(cluster: Cluster) -> None:
    a, b = cluster.start(2, workers=2)
    scheme = cluster.redis_url.split("://", 1)[0]
    assert f"broker {scheme})" in a.log(), "the servers use the broker under test"
    urls = [a.url, b.url]
    room = "spanning"
    # Six members, alternating servers (and, within a server, spread over workers).
    members = [ReliableClient([urls[i % 2], urls[(i + 1) % 2]], f"m{i}", room) for i in range(6)]
    for m in members:
        await m.connect()
    # Cluster-wide presence: every member is listed by both servers.
    names = sorted(m.sender for m in members)
    for server in (a, b):
        await eventually(
            lambda s=server: s.http_get(f"/api/rooms/{room}/members")["members"], names
        )
    await eventually(
        lambda: {"room_id": room, "members": 6} in b.http_get("/api/rooms")["rooms"], True
    )

    # Publishers on every server at once.
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(m.run(40, rate=100, deadline=loop.time() + 60) for m in members))
    stored = cluster.stored(room)
    for m in members:
        await m.settle(max(stored))
    report = check_room(members, stored)
    print("cluster:", summary(report))
    assert report["acked"] == 240 and report["stored"] == 240
    assert (
        report["lost"] == report["duplicates"] == report["out_of_order"] == report["missing"] == 0
    )
    orders = {tuple(f["id"] for f in m.received) for m in members}
    assert len(orders) == 1, "every member sees the identical order"

    # A retried client_msg_id, sent to the other server, is stored once.
    retry = await ChatClient(b.url, "m0").connect()
    await retry.join(room)
    first_ack = members[0].acked["m0-0"]
    await retry.send(
        {"action": "message", "room_id": room, "content": "m0 #0", "client_msg_id": "m0-0"}
    )
    await retry.wait_for(lambda: bool(retry.of("ack")))
    assert (
        retry.of("ack")[0]["seq"] == first_ack["seq"]
        and retry.of("ack")[0]["id"] == first_ack["id"]
    )
    await asyncio.sleep(0.3)
    assert retry.of("message") == [], "a retry is not delivered again"
    assert len(cluster.stored(room)) == 240
    await retry.close()

    # since_seq reconnect to the other server misses nothing.
    late = members[1]
    await late.close()
    cut_at = late.last_seq - 25
    del late.received[-25:]
    rejoin = ReliableClient([a.url], "m1-again", room)
    await rejoin.connect(since_seq=cut_at)
    await members[0].run(45, rate=100, deadline=loop.time() + 30)  # 5 more live messages
    await rejoin.settle(max(cluster.stored(room)))
    seqs = [f["seq"] for f in rejoin.received]
    assert seqs == sorted(cluster.stored(room))[cut_at:], "replay then live, no gap, no duplicate"
    for m in [*members, rejoin]:
        await m.close()
