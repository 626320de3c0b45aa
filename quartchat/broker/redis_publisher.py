"""The publisher task of the Redis brokers (redis:// and redis+cluster://), and their errors.

``publish()`` never writes to Redis itself: it queues ``(channel, payload,
waiter)`` on a bounded :data:`Outbox` and waits (:func:`send_publish`). One
publisher task per outbox (:func:`publisher_loop`) sends whatever is queued
in one pipeline, up to ``_PUBLISH_BATCH`` at a time, and settles each
caller's waiter with the result of its own command. A caller that gave up
(its ``timeout_s`` passed) is skipped; a broker that closes fails every
waiter still queued or in flight with BrokerError.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import RedisError

from . import BrokerError

__all__ = ["Outbox", "publisher_loop", "send_publish"]

_PUBLISH_BATCH = 500


def _wrap(exc: BaseException) -> BrokerError:
    return BrokerError(f"redis: {type(exc).__name__}: {exc}")


_ERRORS = (RedisError, OSError, RuntimeError, TimeoutError)

# Publishes waiting for the publisher task: (channel, payload, the caller's waiter).
Outbox = asyncio.Queue[tuple[str, bytes, asyncio.Future[None]]]


async def send_publish(outbox: Outbox, channel: str, payload: bytes, timeout_s: float) -> None:
    """Queue one publish and wait until the publisher sent it (BrokerError past ``timeout_s``)."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        async with asyncio.timeout(timeout_s):
            await outbox.put((channel, payload, waiter))
            await waiter
    except TimeoutError as exc:
        raise BrokerError(f"redis: publish not sent within {timeout_s:g} s") from exc


async def publisher_loop(client: Any, outbox: Outbox, command: str) -> None:
    """Send queued publishes (``command`` is PUBLISH, or SPUBLISH on a cluster), everything
    queued at once in one pipeline (on a cluster: one per master, sent concurrently)."""
    while True:
        batch = [await outbox.get()]
        while len(batch) < _PUBLISH_BATCH and not outbox.empty():
            batch.append(outbox.get_nowait())
        batch = [item for item in batch if not item[2].done()]  # given up by the caller
        if not batch:
            continue
        try:
            async with client.pipeline(transaction=False) as pipe:
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
