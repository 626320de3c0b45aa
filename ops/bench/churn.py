"""Connection churn: many short-lived clients, each connect -> join -> post -> ack -> close.

    python3 ops/bench/churn.py --urls ws://127.0.0.1:8080/chat --cycles 10000 \
        --concurrency 100 --rooms 500 --pids 1234,5678 [--settle 5]

``--concurrency`` loops run at once; cycle ``i`` uses room ``<prefix>-<i % rooms>``
and server ``urls[i % len(urls)]``. Every post carries a ``client_msg_id``; a
cycle counts as ok only when its ``ack`` came back. The resident set size
(VmRSS of ``/proc/PID/status``, in MB) of every ``--pids`` process is read
before and after the churn, and again after ``--settle`` seconds (to let idle
rooms retire). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections import Counter
from typing import Any

import orjson
import websockets

__all__ = ["churn", "main", "rss_mb"]


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _expect(ws: Any, type_: str, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == type_:
                return frame
            if frame["type"] == "error":
                raise RuntimeError(f"error frame: {frame.get('code')}: {frame.get('message')}")


async def _cycle(url: str, sender: str, room: str, n: int, timeout: float) -> None:
    async with websockets.connect(
        f"{url}?sender_id={sender}",
        ping_interval=None,
        compression=None,
        open_timeout=timeout,
        close_timeout=timeout,
    ) as ws:
        await _expect(ws, "welcome", timeout)
        await ws.send(orjson.dumps({"action": "join", "room_id": room}).decode())
        await _expect(ws, "joined", timeout)
        cmid = f"{sender}-{n}"
        await ws.send(
            orjson.dumps(
                {
                    "action": "message",
                    "room_id": room,
                    "content": f"churn {n}",
                    "client_msg_id": cmid,
                }
            ).decode()
        )
        ack = await _expect(ws, "ack", timeout)
        if ack.get("client_msg_id") != cmid:
            raise RuntimeError(f"ack for {ack.get('client_msg_id')!r}, expected {cmid!r}")


async def churn(
    urls: list[str],
    cycles: int,
    concurrency: int,
    rooms: int,
    *,
    prefix: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Run the churn; returns counts (ok, errors by kind) and the duration."""
    prefix = prefix or f"churn-{secrets.token_hex(3)}"
    counter = iter(range(cycles))
    errors: Counter[str] = Counter()
    ok = 0

    async def loop(worker: int) -> None:
        nonlocal ok
        for n in counter:
            try:
                await _cycle(
                    urls[n % len(urls)], f"{prefix}-u{worker}", f"{prefix}-r{n % rooms}", n, timeout
                )
                ok += 1
            except Exception as exc:  # noqa: BLE001 (counted, never fatal: the report says)
                detail = f": {exc}"[:80] if isinstance(exc, RuntimeError) else ""
                errors[type(exc).__name__ + detail] += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(w) for w in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "cycles": cycles,
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "seconds": round(elapsed, 2),
        "cycles_per_s": round(cycles / elapsed, 1) if elapsed else None,
        "rooms": rooms,
        "concurrency": concurrency,
        "prefix": prefix,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--urls", required=True, help="comma-separated ws://host:port/chat URLs")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--pids", default="", help="comma-separated server PIDs to read VmRSS of")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after the churn before a last RSS reading",
    )
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per step of a cycle")
    ap.add_argument("--prefix", default=None, help="sender/room id prefix (default: random)")
    args = ap.parse_args(argv)
    urls = [u.strip() for u in args.urls.split(",") if u.strip()]
    pids = [int(p) for p in args.pids.split(",") if p.strip()]
    before = {str(p): rss_mb(p) for p in pids}
    result = asyncio.run(
        churn(
            urls,
            args.cycles,
            args.concurrency,
            args.rooms,
            prefix=args.prefix,
            timeout=args.timeout,
        )
    )
    result["rss_mb"] = {"before": before, "after": {str(p): rss_mb(p) for p in pids}}
    if args.settle > 0:
        time.sleep(args.settle)
        result["rss_mb"]["settled"] = {str(p): rss_mb(p) for p in pids}
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
