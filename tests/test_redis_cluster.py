"""redis+cluster:// under faults: a master killed with -9 (its replica takes over) and a
busy room's slot migrated to another master, both mid-stream, with two `quartchat
serve` processes and members on both. Each asserts no acked message lost, duplicated
or out of order at any member, and prints the figures (and the longest time any
member went without a message from the other server: the time to resume).
Every test starts a 6-node cluster of its own (tests/redis_cluster_util.py)."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from quartchat import metrics
from quartchat.broker import BrokerError
from quartchat.broker.redis_cluster import RedisClusterBroker
from quartchat.config import ConfigError, Settings
from quartchat.validate import parse_cluster_url

from .cluster import Cluster, eventually, summary
from .redis_cluster_util import RedisClusterServers
from .servers import ReliableClient, check_room
from .test_broker_contract import Inbox

ROOM = "busy"


class TimedMember(ReliableClient):
    """A ReliableClient that stamps when each message arrived (within its 5 ms poll)."""

    def __init__(self, urls: list[str], sender: str, room: str) -> None:
        super().__init__(urls, sender, room)
        self.arrivals: list[float] = []

    def _absorb(self) -> None:
        before = len(self.received)
        super()._absorb()
        self.arrivals += [time.monotonic()] * (len(self.received) - before)


def longest_silence(member: TimedMember, remote: set[str], since: float) -> float:
    """The longest wait, from ``since``, between messages of senders on the other server."""
    times = [since] + [
        t
        for t, f in zip(member.arrivals, member.received)
        if f["sender_id"] in remote and t >= since
    ]
    return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else float("inf")


def resubscribed_after(log: str, since: datetime.datetime) -> float:
    """Seconds from ``since`` to the server's first "rooms resubscribed" line after it."""
    for line in log.splitlines():
        if "rooms resubscribed" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            if stamp >= since:
                return (stamp - since).total_seconds()
    return float("inf")


async def stream_with_fault(
    tmp_path: Path, label: str, fault: Any, *, count: int = 150, rate: float = 30
) -> tuple[Cluster, RedisClusterServers]:
    """Two servers, four members (two on each) posting ``count`` each at ``rate``/s; the
    fault runs (in a thread) 1.5 s in. Asserts the guarantees; prints the figures."""
    servers = RedisClusterServers(tmp_path).start()
    cluster = Cluster(tmp_path, redis_url=servers.url)
    try:
        a, b = cluster.start(2, workers=1)
        members = [TimedMember([[a, b][i % 2].url], f"f{i}", ROOM) for i in range(4)]
        for m in members:
            await m.connect()
        on = {m.sender: i % 2 for i, m in enumerate(members)}
        loop = asyncio.get_running_loop()
        runs = [
            asyncio.create_task(m.run(count, rate=rate, deadline=loop.time() + 60)) for m in members
        ]
        await asyncio.sleep(1.5)
        fault_wall = datetime.datetime.now()
        fault_at = time.monotonic()
        detail = await asyncio.to_thread(fault, servers, cluster)
        fault_took = time.monotonic() - fault_at
        await asyncio.gather(*runs)
        stored = cluster.stored(ROOM)
        for m in members:
            await m.settle(max(stored))
        report = check_room(list(members), stored)
        silences = {
            m.sender: longest_silence(
                m, {s for s, side in on.items() if side != on[m.sender]}, fault_at
            )
            for m in members
        }
        resume = max(silences.values())
        resubscribed = {s.name: resubscribed_after(s.log(), fault_wall) for s in cluster.servers}
        print(
            f"\n{label}: {summary(report)} {detail} fault_took={fault_took:.2f}s "
            f"time_to_resume={resume:.2f}s (longest wait for the other server's messages, "
            f"per member: {', '.join(f'{k}={v:.2f}s' for k, v in silences.items())}) "
            "pub/sub resubscribed after: "
            + ", ".join(f"{k}={v:.2f}s" for k, v in resubscribed.items())
        )
        assert report["sent"] == report["acked"] == report["stored"] == 4 * count
        assert report["lost"] == report["duplicates"] == report["out_of_order"] == 0
        assert report["missing"] == 0
        assert set(report["delivered"].values()) == {4 * count}
        assert resume < 10, "delivery resumes within seconds"
        for server in (a, b):  # presence moved or failed over with the slot
            await eventually(
                lambda s=server: s.http_get(f"/api/rooms/{ROOM}/members")["members"],
                sorted(on),
                timeout=15,
            )
        for m in members:
            await m.close()
        return cluster, servers
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        servers.close()


async def test_master_killed_mid_stream_replica_takes_over(tmp_path: Path) -> None:
    def kill_owner(servers: RedisClusterServers, cluster: Cluster) -> str:
        channel = f"{{{cluster.prefix}:{ROOM}}}:chan"
        victim = servers.owner(channel)
        servers.kill(victim)
        killed = time.monotonic()
        deadline = killed + 20
        while True:  # until a live node says another master owns the slot
            try:
                owner = servers.owner(channel)
            except (AssertionError, redis.RedisError):  # uncovered, or asked the dead node
                owner = victim
            if owner != victim:
                break
            assert time.monotonic() < deadline, "no replica took over"
            time.sleep(0.05)
        servers.wait_ok()
        return f"killed={victim} new_owner={owner} failover={time.monotonic() - killed:.2f}s"

    cluster, _ = await stream_with_fault(tmp_path, "master kill -9", kill_owner)
    for server in cluster.servers:  # the pub/sub path healed itself, not only the store
        assert "rooms resubscribed" in server.log(), server.log()


async def test_busy_rooms_slot_migrated_mid_stream(tmp_path: Path) -> None:
    def migrate(servers: RedisClusterServers, cluster: Cluster) -> str:
        channel = f"{{{cluster.prefix}:{ROOM}}}:chan"
        slot = key_slot(channel.encode())
        source = servers.owner(channel)
        target = next(p for p in servers.masters() if p != source)
        servers.move_slot(slot, source, target)
        assert servers.owner(channel) == target
        return f"slot={slot} from={source} to={target}"

    cluster, _ = await stream_with_fault(tmp_path, "slot migration", migrate)
    for server in cluster.servers:
        assert "slot moved away" in server.log(), server.log()
        assert "rooms resubscribed" in server.log(), server.log()


def test_cluster_urls_are_checked() -> None:
    parsed = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001/")
    assert parsed.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (parsed.username, parsed.password) == ("u", "p@ss")
    url = "redis+cluster://127.0.0.1:7000"
    assert Settings.from_env({"QUARTCHAT_BROKER_URL": url}, env_file=None).broker_url == url
    for bad in ["redis+cluster://", "redis+cluster://host", "redis+cluster://h:0,h:x"]:
        with pytest.raises(ConfigError, match="host:port"):
            Settings.from_env({"QUARTCHAT_BROKER_URL": bad}, env_file=None)


async def test_a_frozen_master_costs_only_its_own_rooms(tmp_path: Path) -> None:
    """SIGSTOP one master (no reset: only the pong watchdog sees it) while rooms live on
    all three: publishes to the other masters' rooms go on at once, nobody there is told
    to catch up; the frozen master's rooms are told None once its replica took over,
    and hear publishes again."""
    servers = RedisClusterServers(tmp_path).start()
    pub = RedisClusterBroker(servers.url, prefix="t", server_id="pub", timeout_s=2)
    sub = RedisClusterBroker(servers.url, prefix="t", server_id="sub", timeout_s=2)
    await pub.start()
    await sub.start()
    try:
        rooms = [f"r{i}" for i in range(30)]
        inboxes = {room: Inbox() for room in rooms}
        for room in rooms:
            await sub.subscribe(room, inboxes[room])
        victim = servers.owner("{t:r0}:chan")
        frozen = [r for r in rooms if servers.owner(f"{{t:{r}}}:chan") == victim]
        others = [r for r in rooms if r not in frozen]
        assert frozen and others
        servers.pause(victim)
        paused = time.monotonic()
        stuck = [asyncio.create_task(pub.publish(r, b"into the void")) for r in frozen]
        await asyncio.sleep(0.1)  # those are in flight to the frozen master
        for room in others:
            await pub.publish(room, b"during")
        took = time.monotonic() - paused
        assert took < 1.0, f"the other masters' publishes waited {took:.2f} s"
        for room in others:
            assert await inboxes[room].wait(1) == [b"during"]
        await asyncio.gather(*stuck, return_exceptions=True)
        for room in frozen:
            await inboxes[room].wait(1, timeout=20)
        recovered = time.monotonic() - paused
        assert all(inboxes[r].items[0] is None for r in frozen)
        for room in frozen:  # the publisher's slot map heals on its own errors
            deadline = time.monotonic() + 15
            while True:
                try:
                    await pub.publish(room, b"after")
                    break
                except BrokerError:
                    assert time.monotonic() < deadline
        publishing = time.monotonic() - paused
        for room in frozen:
            assert (await inboxes[room].wait(2))[-1] == b"after"
        for room in others:
            assert inboxes[room].items == [b"during"], "untouched rooms need no catch-up"
        assert sub.connected
        sample = metrics.REGISTRY.get_sample_value
        assert sample("quartchat_broker_node_up", {"node": f"127.0.0.1:{victim}"}) == 0
        alive = next(p for p in servers.ports if p != victim)
        new_owner = servers.owner("{t:r0}:chan", via=alive)
        resubscribed = sample(
            "quartchat_broker_node_resubscribes_total", {"node": f"127.0.0.1:{new_owner}"}
        )
        assert resubscribed is not None and resubscribed >= len(frozen)
        print(
            f"\nfrozen master: {len(frozen)} of {len(rooms)} rooms told to catch up after "
            f"{recovered:.2f}s, publishing to them again after {publishing:.2f}s; the other "
            f"{len(others)} published within {took:.2f}s"
        )
    finally:
        await pub.close()
        await sub.close()
        servers.close()


async def test_subscribe_with_a_stale_slot_map_follows_moved(tmp_path: Path) -> None:
    """A slot moved while this process had no room in it (no sunsubscribe reached it):
    its SSUBSCRIBE meets MOVED; the subscribe still returns promptly, subscribed on
    the new owner, and what is published after it is delivered."""
    servers = RedisClusterServers(tmp_path, replicas=0).start()
    pub = RedisClusterBroker(servers.url, prefix="t", server_id="pub", timeout_s=3)
    sub = RedisClusterBroker(servers.url, prefix="t", server_id="sub", timeout_s=3)
    await pub.start()
    await sub.start()
    try:
        channel = "{t:moving}:chan"
        source = servers.owner(channel)
        target = next(p for p in servers.masters() if p != source)
        await asyncio.to_thread(servers.move_slot, key_slot(channel.encode()), source, target)
        inbox = Inbox()
        started = time.monotonic()
        await sub.subscribe("moving", inbox)
        took = time.monotonic() - started
        assert took < 1.5, f"subscribe took {took:.2f} s"
        assert sub.masters().get(f"127.0.0.1:{target}") == 1
        await pub.publish("moving", b"hello")
        items = await inbox.wait(2)
        assert items[-1] == b"hello" and set(items[:-1]) <= {None}
    finally:
        await pub.close()
        await sub.close()
        servers.close()
