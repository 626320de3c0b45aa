"""The publisher task of the Redis brokers (redis:// and redis+cluster://), and their errors.

``publish()`` never writes to Redis itself: it queues ``(channel, payload,
waiter)`` on a bounded :data:`Outbox` before it returns, and hands back the wait
(:func:`queue_publish`). So the publisher task is woken ahead of whatever its
caller wakes next: the room's writer queues the publish, then tells the actor,
and the payload is on its way to the other servers while the actor delivers to
this server's members. One
publisher task per outbox (:func:`publisher_loop`) sends whatever is queued
in one pipeline, up to ``_PUBLISH_BATCH`` at a time, and settles each
caller's waiter with the result of its own command. A caller that gave up
(its ``timeout_s`` passed) is skipped; a broker that closes fails every
waiter still queued or in flight with BrokerError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from redis.exceptions import RedisError

from . import BrokerError

__all__ = ["Outbox", "publisher_loop", "queue_publish"]

_PUBLISH_BATCH = 500


def _wrap(exc: BaseException) -> BrokerError:
    return BrokerError(f"redis: {type(exc).__name__}: {exc}")


_ERRORS = (RedisError, OSError, RuntimeError, TimeoutError)

# Publishes waiting for the publisher task: (channel, payload, the caller's waiter).
Outbox = asyncio.Queue[tuple[str, bytes, asyncio.Future[None]]]


def queue_publish(
    outbox: Outbox, channel: str, payload: bytes, timeout_s: float
) -> Awaitable[None]:
    """Queue one publish now and return the wait until the publisher sent it
    (BrokerError past ``timeout_s``). A full outbox (Redis has not taken the
    last 10,000) fails the publish at once, so publishes stay in call order and
    a room's writer does not wait behind them; other servers read what was not
    published from the store."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        outbox.put_nowait((channel, payload, waiter))
    except asyncio.QueueFull:
        waiter.set_exception(BrokerError(f"redis: {outbox.maxsize} publishes waiting to be sent"))
        return waiter
    return _wait_sent(waiter, timeout_s)


async def _wait_sent(waiter: asyncio.Future[None], timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await waiter
    except TimeoutError as exc:
        raise BrokerError(f"redis: publish not sent within {timeout_s:g} s") from exc
    finally:
        if not waiter.done():
            waiter.cancel()  # given up: the publisher skips it


async def publisher_loop(
    client: Any, outbox: Outbox, command: str, timeout_s: float | None
) -> None:
    """Send queued publishes (``command`` is PUBLISH, or SPUBLISH on a cluster), everything
    queued at once in one pipeline (on a cluster: one per master, sent concurrently),
    each pipeline bounded by ``timeout_s`` (redis-py closes a connection cut off mid-command;
    None: by the client's own socket timeout, as on a cluster)."""
    while True:
        batch = [await outbox.get()]
        while len(batch) < _PUBLISH_BATCH and not outbox.empty():
            batch.append(outbox.get_nowait())
        batch = [item for item in batch if not item[2].done()]  # given up by the caller
        if not batch:
            continue
        try:
            async with asyncio.timeout(timeout_s), client.pipeline(transaction=False) as pipe:
                for channel, payload, _ in batch:
                    pipe.execute_command(command, channel, payload)
                results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(BrokerError("redis: broker closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
            results = [exc] * len(batch)
        for (_, _, waiter), result in zip(batch, results):
            if waiter.done():
                continue
            if isinstance(result, Exception):
                waiter.set_exception(_wrap(result))
            else:
                waiter.set_result(None)
