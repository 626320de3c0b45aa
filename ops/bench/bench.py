"""quartchat load generator and scenario runner.

Speaks protocol v1 to any list of server URLs. Every run is bounded in time,
appends one JSON line to the results file and prints a table.

    python3 ops/bench/bench.py all                 # start 2 servers (MariaDB + Redis), run all
    python3 ops/bench/bench.py fanout --rooms 50 --members 20 --rate 10
    python3 ops/bench/bench.py smoke               # seconds-long run of every scenario (CI)
    python3 ops/bench/bench.py fanout --urls ws://h1:8080/chat,ws://h2:8080/chat

Without ``--urls`` it starts the servers it needs itself (``quartchat serve``
processes on loopback, a database and a Redis key prefix of their own) and
stops them afterwards. Latency is measured from a timestamp carried in the
message content to its arrival at each member (same machine clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import websockets

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results.jsonl"
README = ROOT / "README.md"
MYSQL_SERVER = os.environ.get("QUARTCHAT_BENCH_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("QUARTCHAT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


# ---------------------------------------------------------------- measurement


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def _pids_of_group(pid: int) -> list[int]:
    """pid and every process whose parent chain leads to it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def service_pids() -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for name, pattern in (("redis", "redis-server"), ("mysql", "mariadbd")):
        try:
            out = subprocess.run(
                ["pgrep", "-f", pattern], capture_output=True, check=False, text=True, timeout=5
            )
            pids[name] = [int(p) for p in out.stdout.split()]
        except (OSError, subprocess.SubprocessError):
            pids[name] = []
    return pids


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Servers:
    """``count`` quartchat servers on one MariaDB database and one Redis prefix of their own."""

    def __init__(self, count: int, workers: int, workdir: Path, extra_env: dict[str, str]) -> None:
        self.count = count
        self.workers = workers
        self.workdir = workdir
        self.extra_env = extra_env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.db_name = f"qc_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.prefix = f"qcbench-{secrets.token_hex(4)}"

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{p}/chat" for p in self.ports]

    @property
    def database_url(self) -> str:
        return f"{MYSQL_SERVER}/{self.db_name}"

    def _admin(self, sql: str) -> Any:
        import pymysql
        from sqlalchemy.engine import make_url

        url = make_url(MYSQL_SERVER)
        conn = pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            password=url.password or "",
            connect_timeout=5,
            autocommit=True,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def stored_count(self) -> int:
        rows = self._admin(f"SELECT COUNT(*) FROM `{self.db_name}`.messages")
        return int(rows[0][0])

    def start(self) -> Servers:
        self._admin(f"CREATE DATABASE `{self.db_name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        env = {
            **os.environ,
            "QUARTCHAT_DATABASE_URL": self.database_url,
            "QUARTCHAT_BROKER_URL": REDIS_URL,
            "QUARTCHAT_REDIS_PREFIX": self.prefix,
            "QUARTCHAT_RATE_PER_S": "0",
            "QUARTCHAT_OUTBOUND_QUEUE": "20000",
            "QUARTCHAT_MAX_ROOMS": "1000",
            "QUARTCHAT_LOG_LEVEL": "warning",
            "QUARTCHAT_HYPERCORN_CONFIG": str(ROOT / "hypercorn.toml"),
            **self.extra_env,
        }
        for i in range(self.count):
            port = free_port()
            with open(self.workdir / f"bench-server{i}.log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "quartchat",
                        "serve",
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--workers",
                        str(self.workers),
                    ],
                    env={**env, "QUARTCHAT_SERVER_ID": f"bench{i}"},
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.ports.append(port)
        for port, proc in zip(self.ports, self.procs):
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server on {port} exited {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server on {port} not ready") from None
                    time.sleep(0.1)
        return self

    def pids(self) -> list[int]:
        return [p for proc in self.procs for p in _pids_of_group(proc.pid)]

    def worker_pids(self, index: int) -> list[int]:
        return _pids_of_group(self.procs[index].pid)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        import pymysql
        import redis

        try:
            self._admin(f"DROP DATABASE IF EXISTS `{self.db_name}`")
        except (OSError, pymysql.Error) as exc:
            print(f"bench: database {self.db_name} not dropped: {exc}", file=sys.stderr)
        try:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except (OSError, redis.RedisError) as exc:
            print(f"bench: keys {self.prefix}:* not deleted: {exc}", file=sys.stderr)


def _server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    if args.token_secret:
        env.update({"QUARTCHAT_AUTH": "jwt", "QUARTCHAT_JWT_SECRET": args.token_secret})
    for item in args.server_env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--server-env takes KEY=VALUE, not {item!r}")
        env[key] = value
    return env


@contextmanager
def servers_for(
    args: argparse.Namespace, count: int = 2
) -> Iterator[tuple[list[str], Servers | None]]:
    shared = getattr(args, "shared_servers", None)
    if shared is not None:  # a suite started them once for all its scenarios
        yield shared.urls[:count], shared
        return
    if args.urls:
        yield args.urls.split(","), None
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    servers = Servers(count, args.workers, workdir, _server_env(args))
    try:
        servers.start()
        yield servers.urls, servers
    finally:
        servers.stop()


# ---------------------------------------------------------------- clients


# Auth mode jwt: with --token-secret every connection carries a token minted here (HS256,
# one hour). Read from the environment so the spawned generator processes see it too.
TOKEN_SECRET_ENV = "QUARTCHAT_BENCH_TOKEN_SECRET"


def _chat_url(url: str, sender: str) -> str:
    secret = os.environ.get(TOKEN_SECRET_ENV)
    if not secret:
        return f"{url}?sender_id={sender}"
    import jwt

    now = int(time.time())
    token = jwt.encode({"sub": sender, "iat": now, "exp": now + 3600}, secret, algorithm="HS256")
    return f"{url}?token={token}"


# What a failed connect or join raises (counted as a failure; anything else is a bug).
CONNECT_ERRORS = (OSError, websockets.WebSocketException, RuntimeError)


async def _connect(url: str, sender: str) -> Any:
    ws = await websockets.connect(
        _chat_url(url, sender),
        ping_interval=None,
        compression=None,
        open_timeout=30,
        max_queue=None,
        close_timeout=2,
    )
    await ws.recv()  # welcome
    return ws


async def _join(ws: Any, room: str) -> None:
    await ws.send(f'{{"action":"join","room_id":"{room}"}}')
    while True:
        frame = orjson.loads(await ws.recv())
        if frame["type"] == "joined":
            return
        if frame["type"] == "error":
            raise RuntimeError(f"join failed: {frame}")


class MemberStats:
    __slots__ = ("duplicates", "last_seq", "latencies", "out_of_order", "received")

    def __init__(self) -> None:
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.last_seq = 0
        self.latencies: list[float] = []


async def _member_loop(ws: Any, stats: MemberStats, stop: asyncio.Event, sample: int) -> None:
    count = 0
    try:
        async for raw in ws:
            now = time.time_ns()
            if '"type":"message"' not in raw:
                continue
            frame = orjson.loads(raw)
            seq = frame["seq"]
            if seq <= stats.last_seq:
                if seq == stats.last_seq:
                    stats.duplicates += 1
                else:
                    stats.out_of_order += 1
                continue
            stats.last_seq = seq
            stats.received += 1
            count += 1
            if count % sample == 0:
                sent_ns = int(frame["content"].split(" ", 1)[0])
                stats.latencies.append((now - sent_ns) / 1e6)
    except websockets.ConnectionClosed:
        pass


def _plan(
    rooms: int, members: int, urls: list[str], procs: int
) -> list[list[tuple[str, int, str]]]:
    """(room, member index, url) assignments, split over generator processes."""
    out: list[list[tuple[str, int, str]]] = [[] for _ in range(procs)]
    i = 0
    for r in range(rooms):
        for m in range(members):
            out[i % procs].append((f"bench-{r}", m, urls[(r + m) % len(urls)]))
            i += 1
    return out


def _gen_worker(
    assign: list[tuple[str, int, str]],
    rate: float,
    duration: float,
    sample: int,
    ready: Any,
    go: Any,
    results: Any,
    tag: str,
) -> None:
    _use_uvloop()
    results.put(asyncio.run(_gen_main(assign, rate, duration, sample, ready, go, tag)))


async def _gen_main(
    assign: list[tuple[str, int, str]],
    rate: float,
    duration: float,
    sample: int,
    ready: Any,
    go: Any,
    tag: str,
) -> dict[str, Any]:
    started = time.monotonic()
    conns: list[tuple[str, int, Any]] = []
    failures = 0
    sem = asyncio.Semaphore(200)

    async def open_one(room: str, idx: int, url: str) -> None:
        nonlocal failures
        async with sem:
            try:
                ws = await _connect(url, f"{tag}-{room}-{idx}")
                await _join(ws, room)
                conns.append((room, idx, ws))
            except CONNECT_ERRORS:
                failures += 1

    await asyncio.gather(*(open_one(r, i, u) for r, i, u in assign))
    connect_s = time.monotonic() - started
    ready.wait()  # every generator process connected
    go.wait()
    stop = asyncio.Event()
    stats = {(room, idx): MemberStats() for room, idx, _ in conns}
    readers = [
        asyncio.create_task(_member_loop(ws, stats[(room, idx)], stop, sample))
        for room, idx, ws in conns
    ]
    publishers = [(room, ws) for room, idx, ws in conns if idx == 0]
    acked: dict[str, int] = {room: 0 for room, _ in publishers}

    async def publish(room: str, ws: Any) -> None:
        if rate <= 0:
            return
        interval = 1.0 / rate
        # Publishers start at random points of one interval: otherwise every room
        # posts at the same instant and the run measures bursts, not the rate.
        t0 = time.monotonic() + random.random() * interval
        n = 0
        while True:
            target = t0 + n * interval
            if target - t0 >= duration:
                break
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(
                orjson.dumps(
                    {
                        "action": "message",
                        "room_id": room,
                        "content": f"{time.time_ns()} {room} {n}",
                    }
                ).decode()
            )
            n += 1
        acked[room] = n

    t_pub = time.monotonic()
    await asyncio.gather(*(publish(r, ws) for r, ws in publishers))
    pub_s = time.monotonic() - t_pub
    # Every generator process (with publishers or not) listens for the whole
    # run, plus time for in-flight messages to arrive.
    await asyncio.sleep(max(0.0, t_pub + duration - time.monotonic()) + 2.0)
    for _, _, ws in conns:
        await ws.close()
    await asyncio.gather(*readers, return_exceptions=True)
    per_room_received: dict[str, list[int]] = {}
    latencies: list[float] = []
    dup = ooo = 0
    for (room, _), s in stats.items():
        per_room_received.setdefault(room, []).append(s.received)
        latencies.extend(s.latencies)
        dup += s.duplicates
        ooo += s.out_of_order
    return {
        "connected": len(conns),
        "failures": failures,
        "connect_s": connect_s,
        "published": acked,
        "received": per_room_received,
        "latencies": latencies,
        "duplicates": dup,
        "out_of_order": ooo,
        "publish_s": pub_s,
    }


def run_fanout(
    urls: list[str],
    servers: Servers | None,
    *,
    rooms: int,
    members: int,
    rate: float,
    duration: float,
    procs: int,
    sample: int = 1,
) -> dict[str, Any]:
    """R rooms x S members over all URLs, one publisher per room at ``rate`` msg/s."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(procs + 1)
    go = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    plans = _plan(rooms, members, urls, procs)
    workers = [
        ctx.Process(
            target=_gen_worker, args=(plans[i], rate, duration, sample, ready, go, results, f"g{i}")
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    ready.wait(timeout=300)
    pids = {
        "servers": servers.pids() if servers else [],
        "generator": [w.pid for w in workers if w.pid],
        **service_pids(),
    }
    cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
    t0 = time.monotonic()
    go.wait(timeout=60)
    parts = [results.get(timeout=duration + 300) for _ in workers]
    wall = time.monotonic() - t0
    cpu = {k: round((cpu_seconds(v) - cpu0[k]) / wall * 100, 1) for k, v in pids.items()}
    for w in workers:
        w.join(30)
    published: dict[str, int] = {}
    received: dict[str, list[int]] = {}
    latencies: list[float] = []
    for p in parts:
        published.update(p["published"])
        for room, counts in p["received"].items():
            received.setdefault(room, []).extend(counts)
        latencies.extend(p["latencies"])
    expected = sum(published.get(room, 0) * len(counts) for room, counts in received.items())
    delivered = sum(sum(c) for c in received.values())
    publish_s = max(p["publish_s"] for p in parts) or duration
    return {
        "rooms": rooms,
        "members": members,
        "rate_per_room": rate,
        "duration_s": duration,
        "connected": sum(p["connected"] for p in parts),
        "connect_failures": sum(p["failures"] for p in parts),
        "published": sum(published.values()),
        "delivered": delivered,
        "expected": expected,
        "deliveries_per_s": round(delivered / publish_s, 1),
        "loss": round(1 - delivered / expected, 6) if expected else None,
        "duplicates": sum(p["duplicates"] for p in parts),
        "out_of_order": sum(p["out_of_order"] for p in parts),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2) if latencies else None,
        "cpu_percent": cpu,
    }


# ---------------------------------------------------------------- scenarios


def sc_fanout(args: argparse.Namespace) -> dict[str, Any]:
    with servers_for(args) as (urls, servers):
        return run_fanout(
            urls,
            servers,
            rooms=args.rooms,
            members=args.members,
            rate=args.rate,
            duration=args.duration,
            procs=args.procs,
        )


def _passes(r: dict[str, Any], max_p99: float) -> bool:
    return (
        r["loss"] is not None
        and r["loss"] < 0.001
        and r["duplicates"] == 0
        and r["out_of_order"] == 0
        and r["p99_ms"] <= max_p99
        and r["connect_failures"] == 0
    )


def sc_maxrate(args: argparse.Namespace) -> dict[str, Any]:
    steps = [float(x) for x in args.steps.split(",")]
    best: dict[str, Any] | None = None
    tried = []
    with servers_for(args) as (urls, servers):
        for rate in steps:
            r = run_fanout(
                urls,
                servers,
                rooms=args.rooms,
                members=args.members,
                rate=rate,
                duration=args.duration,
                procs=args.procs,
            )
            ok = _passes(r, 250.0)
            tried.append(
                {
                    "rate_per_room": rate,
                    "deliveries_per_s": r["deliveries_per_s"],
                    "loss": r["loss"],
                    "p99_ms": r["p99_ms"],
                    "pass": ok,
                }
            )
            print(
                f"  maxrate step {rate}/s per room: {r['deliveries_per_s']} deliveries/s, "
                f"loss {r['loss']}, p99 {r['p99_ms']} ms -> {'pass' if ok else 'FAIL'}",
                flush=True,
            )
            if not ok:
                break
            best = r
    return {
        "last_passing": best,
        "steps": tried,
        "deliveries_per_s": best["deliveries_per_s"] if best else 0,
        "p99_ms": best["p99_ms"] if best else None,
        "loss": best["loss"] if best else None,
    }


def sc_bigroom(args: argparse.Namespace) -> dict[str, Any]:
    with servers_for(args) as (urls, servers):
        return run_fanout(
            urls,
            servers,
            rooms=1,
            members=args.members,
            rate=args.rate,
            duration=args.duration,
            procs=args.procs,
        )


def sc_connections(args: argparse.Namespace) -> dict[str, Any]:
    with servers_for(args, count=1) as (urls, servers):
        pids = servers.worker_pids(0) if servers else []
        time.sleep(1.0)
        rss0 = rss_kib(pids)
        _use_uvloop()
        result = asyncio.run(_idle_connections(urls[0], args.count, args.hold, pids))
        result["kib_per_connection"] = None
        if pids:
            result["rss_before_kib"] = rss0
            grown = result["rss_at_peak_kib"] - rss0
            result["kib_per_connection"] = round(grown / max(1, result["connected"]), 1)
        return result


async def _idle_connections(url: str, count: int, hold: float, pids: list[int]) -> dict[str, Any]:
    sem = asyncio.Semaphore(256)
    conns: list[Any] = []
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with sem:
            try:
                ws = await _connect(url, f"idle{i}")
                # Rooms of 10: every socket joined, without a presence storm
                # (each join announces itself to everyone already in the room).
                await _join(ws, f"idle-{i // 10}")
                conns.append(ws)
            except CONNECT_ERRORS:
                failures += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(hold)
    peak = rss_kib(pids)
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return {
        "count": count,
        "connected": len(conns),
        "connect_failures": failures,
        "connect_per_s": round(len(conns) / elapsed, 1),
        "rss_at_peak_kib": peak,
    }


def sc_pingpong(args: argparse.Namespace) -> dict[str, Any]:
    with servers_for(args) as (urls, _servers):
        _use_uvloop()
        return asyncio.run(_pingpong(urls[0], urls[-1], args.count))


async def _pingpong(url_a: str, url_b: str, count: int) -> dict[str, Any]:
    a = await _connect(url_a, "ping-a")
    b = await _connect(url_b, "ping-b")
    await _join(a, "pingpong")
    await _join(b, "pingpong")
    rtts: list[float] = []
    for i in range(count + 20):
        t0 = time.perf_counter_ns()
        await a.send(
            orjson.dumps(
                {"action": "message", "room_id": "pingpong", "content": f"{time.time_ns()} {i}"}
            ).decode()
        )
        while True:
            frame = orjson.loads(await asyncio.wait_for(b.recv(), 10))
            if frame["type"] == "message":
                break
        if i >= 20:  # warm-up excluded
            rtts.append((time.perf_counter_ns() - t0) / 1e6)
    await a.close()
    await b.close()
    return {
        "count": count,
        "p50_ms": round(percentile(rtts, 50), 2),
        "p90_ms": round(percentile(rtts, 90), 2),
        "p99_ms": round(percentile(rtts, 99), 2),
        "max_ms": round(max(rtts), 2),
    }


def sc_store(args: argparse.Namespace) -> dict[str, Any]:
    with servers_for(args) as (urls, servers):
        _use_uvloop()
        before = servers.stored_count() if servers else None
        result = asyncio.run(_store_burst(urls, args.publishers, args.messages))
        if servers:
            result["stored_in_db"] = servers.stored_count() - (before or 0)
        return result


async def _store_burst(urls: list[str], publishers: int, messages: int) -> dict[str, Any]:
    conns = []
    for i in range(publishers):
        ws = await _connect(urls[i % len(urls)], f"burst{i}")
        await _join(ws, f"burst-{i}")
        conns.append(ws)

    async def burst(i: int, ws: Any) -> int:
        async def reader() -> int:
            acks = 0
            async for raw in ws:
                if '"type":"ack"' in raw:
                    acks += 1
                    if acks == messages:
                        return acks
                elif '"type":"error"' in raw:
                    raise RuntimeError(raw)
            return acks

        task = asyncio.create_task(reader())
        for n in range(messages):
            await ws.send(f'{{"action":"message","room_id":"burst-{i}","content":"burst {n}"}}')
        return await asyncio.wait_for(task, 120)

    t0 = time.monotonic()
    acks = await asyncio.gather(*(burst(i, ws) for i, ws in enumerate(conns)))
    elapsed = time.monotonic() - t0
    for ws in conns:
        await ws.close()
    total = sum(acks)
    return {
        "publishers": publishers,
        "messages": total,
        "seconds": round(elapsed, 3),
        "stored_per_s": round(total / elapsed, 1),
    }


# ---------------------------------------------------------------- runner


TARGETS = {
    "maxrate": ">= 40,000 deliveries/s, loss 0, p99 <= 250 ms",
    "fanout": "p50 <= 5 ms, p99 <= 25 ms (50 x 20 at 10/s)",
    "bigroom": "p99 <= 100 ms, loss 0 (1 x 1,000 at 20/s)",
    "connections": "0 failures, <= 30 KiB RSS per connection (10,000 idle)",
    "pingpong": "p50 <= 2 ms, p99 <= 8 ms",
    "store": ">= 10,000 messages/s stored in MariaDB",
}


def summarize(name: str, r: dict[str, Any]) -> str:
    if name in ("fanout", "bigroom"):
        return (
            f"{r['deliveries_per_s']:,.0f} deliveries/s, loss {r['loss']}, dup {r['duplicates']}, "
            f"ooo {r['out_of_order']}, p50 {r['p50_ms']} / p90 {r['p90_ms']} / p99 {r['p99_ms']} / "
            f"max {r['max_ms']} ms; CPU % {r['cpu_percent']}"
        )
    if name == "maxrate":
        best = r.get("last_passing")
        if not best:
            return "no step passed"
        return (
            f"{best['rate_per_room']:g}/s per room: {best['deliveries_per_s']:,.0f} deliveries/s, "
            f"loss {best['loss']}, p99 {best['p99_ms']} ms; CPU % {best['cpu_percent']}"
        )
    if name == "connections":
        return (
            f"{r['connected']}/{r['count']} connected, {r['connect_failures']} failures, "
            f"{r['connect_per_s']:,.0f} connects/s, "
            f"{r['kib_per_connection']} KiB RSS per connection"
        )
    if name == "pingpong":
        return (
            f"p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, "
            f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms"
        )
    if name == "store":
        return (
            f"{r['messages']:,} messages in {r['seconds']} s: {r['stored_per_s']:,.0f} stored/s"
            + (f" ({r['stored_in_db']:,} rows in MariaDB)" if "stored_in_db" in r else "")
        )
    return json.dumps(r)


SCENARIOS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fanout": sc_fanout,
    "maxrate": sc_maxrate,
    "bigroom": sc_bigroom,
    "connections": sc_connections,
    "pingpong": sc_pingpong,
    "store": sc_store,
}

# (scenario, overrides) for `all` (the targets) and `smoke` (seconds, for CI).
SUITES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "all": [
        ("pingpong", {"count": 500}),
        ("store", {"publishers": 50, "messages": 400}),
        ("fanout", {"rooms": 50, "members": 20, "rate": 10, "duration": 10}),
        ("bigroom", {"members": 1000, "rate": 20, "duration": 10}),
        ("connections", {"count": 10000, "hold": 3}),
        (
            "maxrate",
            {
                "rooms": 50,
                "members": 20,
                "duration": 8,
                "steps": "2,4,6,8,10,15,20,30,40,60,80,100",
            },
        ),
    ],
    "smoke": [
        ("pingpong", {"count": 20}),
        ("store", {"publishers": 4, "messages": 50}),
        ("fanout", {"rooms": 3, "members": 4, "rate": 5, "duration": 1.5, "procs": 1}),
        ("bigroom", {"members": 20, "rate": 5, "duration": 1.5, "procs": 1}),
        ("connections", {"count": 50, "hold": 0.5}),
        ("maxrate", {"rooms": 2, "members": 3, "duration": 1.0, "steps": "5,10", "procs": 1}),
    ],
}


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown cpu"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Python {platform.python_version()}"


def record(
    name: str, args: argparse.Namespace, result: dict[str, Any], command: str
) -> dict[str, Any]:
    line = {
        "scenario": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "command": command,
        "servers": args.urls or f"2 x {args.workers} worker(s), started by the tool",
        "result": result,
    }
    with open(args.results, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def table(lines: list[dict[str, Any]]) -> str:
    out = ["| scenario | target | result |", "|---|---|---|"]
    for line in lines:
        out.append(
            f"| {line['scenario']} | {TARGETS.get(line['scenario'], '')} | "
            f"{summarize(line['scenario'], line['result'])} |"
        )
    return "\n".join(out)


def update_readme(lines: list[dict[str, Any]], command: str) -> None:
    text = README.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        raise SystemExit("README has no bench markers")
    body = (
        f"{start}\nMeasured {lines[0]['time']} on {lines[0]['machine']}; servers, Redis, "
        f"MariaDB and the load generator all on this one machine; 2 servers x 1 worker, "
        f"MariaDB persistence on. Command: `{command}`\n\n{table(lines)}\n{end}"
    )
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    README.write_text(before + body + after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=[*SCENARIOS, *SUITES])
    parser.add_argument("--urls", help="comma-separated ws:// URLs (default: start 2 servers)")
    parser.add_argument("--workers", type=int, default=1, help="workers per started server")
    parser.add_argument("--rooms", type=int, default=50)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="messages/s per room")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=2, help="generator processes")
    parser.add_argument("--steps", default="10,20,40,60,80,100")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=2.0)
    parser.add_argument("--publishers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument(
        "--server-env",
        action="append",
        metavar="KEY=VALUE",
        help="extra environment for started servers (repeatable), "
        "e.g. QUARTCHAT_EVENT_LOOP=asyncio for a before/after",
    )
    parser.add_argument(
        "--token-secret",
        default=os.environ.get(TOKEN_SECRET_ENV),
        help="auth mode jwt: mint an HS256 token per connection with this "
        "secret (servers started by the tool get QUARTCHAT_AUTH=jwt with it); "
        f"or set {TOKEN_SECRET_ENV}",
    )
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--workdir", default="/tmp/quartchat-bench")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="write the table into README.md's performance section",
    )
    args = parser.parse_args(argv)
    if args.token_secret:
        os.environ[TOKEN_SECRET_ENV] = args.token_secret  # for the generator processes
    command = "python3 ops/bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plan = SUITES.get(args.scenario) or [(args.scenario, {})]
    lines = []
    shared = None
    if len(plan) > 1 and not args.urls:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        shared = Servers(2, args.workers, workdir, _server_env(args)).start()
    try:
        for name, overrides in plan:
            run_args = argparse.Namespace(**{**vars(args), **overrides, "shared_servers": shared})
            print(f"== {name} {overrides or ''}", flush=True)
            result = SCENARIOS[name](run_args)
            lines.append(record(name, run_args, result, command))
            print(f"   {summarize(name, result)}", flush=True)
    finally:
        if shared is not None:
            shared.stop()
    print()
    print(table(lines))
    if args.update_readme:
        update_readme(lines, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
