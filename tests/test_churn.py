"""Connection churn soak: thousands of connect / join / post / close cycles leave nothing behind.

One real ``quartchat serve`` process (SQLite, hypercorn.toml's 20 s WebSocket
pings, no rate limit, rooms retiring after 1 s idle) and the churn driver of
``ops/bench/churn.py``: ``CONCURRENCY`` clients in loops of connect, join one
of ``ROOMS`` rooms, post, wait for the ack, close.

A short warm-up churn of the same shape comes first: first use of every code
path (imports, compiled queries, the allocator's working set for this many
sockets and rooms at once) is not per connection. Then the soak:

- every post of every cycle is acked (no error, no timeout);
- the server's RSS after the churn, and again once its rooms have retired, is
  within ``RSS_BOUND_MB`` of its RSS after the warm-up;
- the per-connection objects are gone, read from ``/metrics``: no connection
  registered or open, no room actor (running or retiring), asyncio tasks back
  to the idle count, SQLite threads back to their idle count.

Measured on the 2-core CI box (README, "Connection churn"):
before the fixes the soak grew the server by 45 MB (90 -> 135 MB: hypercorn
kept every closed socket for its 20 s ping interval, room tasks pinned their
first joiner's socket, one SQLite thread per store operation); after them by
about 7 MB (84 -> 91 MB), and a second soak adds under 1 MB.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
import time
import urllib.request
from pathlib import Path
from types import ModuleType

from .servers import ROOT, ServerProcess

WARMUP = 300
CYCLES = 3000
CONCURRENCY = 50
ROOMS = 300
RSS_BOUND_MB = 15.0
SETTLE_S = 30.0  # longest wait for rooms to retire and tasks to finish after the churn


def _churn_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qc_churn", ROOT / "ops/bench/churn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


churn = _churn_module()


_ZERO = ("hub_connections", "connections_open", "hub_rooms", "retiring_rooms", "active_rooms")
_COUNTS = (*_ZERO, "asyncio_tasks", "threads", "registry_samples_total")


def _gauges(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(server.http + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        m[1]: float(m[2])
        for m in re.finditer(r"^quartchat_(\w+) ([0-9.e+-]+)$", text, re.MULTILINE)
    }


def _rss(server: ServerProcess) -> float:
    assert server.proc is not None
    value = churn.rss_mb(server.proc.pid)
    assert value is not None, "server process gone"
    return float(value)


async def _counts(server: ServerProcess) -> dict[str, float]:
    return {k: v for k, v in (await asyncio.to_thread(_gauges, server)).items() if k in _COUNTS}


async def _settled(
    server: ServerProcess, idle_tasks: float, idle_threads: float, timeout: float = SETTLE_S
) -> dict[str, float]:
    """Wait (bounded) until nothing of the churn is left; the last gauges read.

    Only samples taken after the call count (the gauges are refreshed every
    second): the sample counter must have grown by two first."""
    deadline = time.monotonic() + timeout
    first = (await _counts(server)).get("registry_samples_total", 0)
    while True:
        g = await _counts(server)
        fresh = g.get("registry_samples_total", first + 2) >= first + 2
        if (
            fresh
            and all(g.get(k, 0) == 0 for k in _ZERO)
            and g.get("asyncio_tasks", 0) <= idle_tasks
            and g.get("threads", 0) <= idle_threads
        ):
            return g
        if time.monotonic() > deadline:
            return g
        await asyncio.sleep(0.5)


async def _idle(server: ServerProcess) -> dict[str, float]:
    """Counts of a fresh server once the SQLite connection of its start-up checks
    has closed (2 s unused): only the main thread left."""
    return await _settled(server, math.inf, 1, timeout=10.0)


async def test_connection_churn_leaves_no_memory_and_no_objects(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path,
        {
            "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/churn.db",
            "QUARTCHAT_RATE_PER_S": "0",
            "QUARTCHAT_ROOM_IDLE_S": "1",
            "QUARTCHAT_LOG_LEVEL": "warning",
        },
        name="churn",
    ).start()
    try:
        urls = [server.url]
        idle = await _idle(server)
        warm = await churn.churn(urls, WARMUP, CONCURRENCY, ROOMS, prefix="warm")
        assert warm["errors"] == 0, warm
        await _settled(server, idle.get("asyncio_tasks", 0), idle.get("threads", 0))
        rss_start = _rss(server)

        result = await churn.churn(urls, CYCLES, CONCURRENCY, ROOMS, prefix="soak")
        rss_after = _rss(server)
        g = await _settled(server, idle.get("asyncio_tasks", 0), idle.get("threads", 0))
        rss_retired = _rss(server)
        print(
            f"churn: {result}; RSS MB after warm-up {rss_start}, after churn {rss_after}, "
            f"after rooms retired {rss_retired}; idle gauges {idle}; settled gauges {g}"
        )

        assert result["ok"] == CYCLES and result["errors"] == 0, result
        assert rss_after - rss_start <= RSS_BOUND_MB, (rss_start, rss_after)
        assert rss_retired - rss_start <= RSS_BOUND_MB, (rss_start, rss_retired)
        assert g["hub_connections"] == 0 and g["connections_open"] == 0, g
        assert g["hub_rooms"] == 0 and g["retiring_rooms"] == 0 and g["active_rooms"] == 0, g
        assert g["asyncio_tasks"] <= idle["asyncio_tasks"], (idle, g)
        assert g["threads"] <= idle["threads"], (idle, g)
    finally:
        server.stop()


async def test_a_closed_socket_is_freed_at_once_not_after_a_ping_interval(tmp_path: Path) -> None:
    """hypercorn.toml pings every 20 s; a closed socket's tasks are gone within seconds."""
    server = ServerProcess(
        tmp_path,
        {
            "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ping.db",
            "QUARTCHAT_ROOM_IDLE_S": "0.5",
        },
        name="ping",
    ).start()
    try:
        idle = await _idle(server)
        result = await churn.churn([server.url], 20, 10, 2, prefix="ping")
        assert result["errors"] == 0, result
        # Well below the 20 s ping interval, for which the sockets' tasks used to stay.
        g = await _settled(server, idle["asyncio_tasks"], idle["threads"], timeout=8.0)
        assert g["asyncio_tasks"] <= idle["asyncio_tasks"], (idle, g)
        assert g["hub_connections"] == g["hub_rooms"] == 0, g
    finally:
        server.stop()
