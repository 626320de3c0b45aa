"""One post at a time, timed at each step a reader sees: the ack and the message on the
sender's server, and the message on another server.

    python3 ops/bench/hop.py --urls ws://127.0.0.1:8001/chat,ws://127.0.0.1:8002/chat

Prints p50 / p90 of each (ms). Pair it with the server's
``quartchat_store_write_seconds`` (``/metrics``) to split a hop into the store's
append and the rest of the post path. Posts are spaced (``--interval-ms``), as a
chat's are: an idle database and event loop answer more slowly than a busy one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import websockets


async def _joined(url: str, sender: str, room: str) -> Any:
    ws = await websockets.connect(f"{url}?sender_id={sender}")
    await ws.recv()  # welcome
    await ws.send(json.dumps({"action": "join", "room_id": room}))
    while json.loads(await ws.recv())["type"] != "joined":
        pass
    return ws


async def run(
    urls: list[str], count: int, interval_s: float, warmup: int
) -> dict[str, list[float]]:
    room = f"hop-{uuid.uuid4().hex[:8]}"
    a = await _joined(urls[0], "hop-a", room)
    b = await _joined(urls[-1], "hop-b", room)
    times: dict[str, list[float]] = {"ack on A": [], "message on A": [], "message on B": []}
    try:
        for i in range(count + warmup):
            start = time.perf_counter()
            await a.send(
                json.dumps(
                    {"action": "message", "room_id": room, "content": "x", "client_msg_id": f"h{i}"}
                )
            )
            got: dict[str, float] = {}
            while len(got) < 2:
                frame = json.loads(await a.recv())
                if frame["type"] in ("ack", "message"):
                    got[frame["type"]] = time.perf_counter()
            while json.loads(await b.recv())["type"] != "message":
                pass
            on_b = time.perf_counter()
            if i >= warmup:
                times["ack on A"].append((got["ack"] - start) * 1000)
                times["message on A"].append((got["message"] - start) * 1000)
                times["message on B"].append((on_b - start) * 1000)
            await asyncio.sleep(interval_s)
    finally:
        await a.close()
        await b.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", required=True, help="comma-separated ws://host:port/chat URLs")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    args = parser.parse_args()
    urls = args.urls.split(",")
    times = asyncio.run(run(urls, args.count, args.interval_ms / 1000, args.warmup))
    for name, values in times.items():
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(f"{name:14s} p50 {statistics.median(values):.2f} ms  p90 {p90:.2f} ms")


if __name__ == "__main__":
    main()
