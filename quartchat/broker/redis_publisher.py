"""The publisher task of the Redis brokers (redis:// and redis+cluster://), and their errors.

``publish()`` never writes to Redis itself: it queues ``(channel, payload,
waiter)`` on a bounded :data:`Outbox` before it returns, and hands back the wait
(:func:`queue_publish`). So the publisher task is woken ahead of whatever its
caller wakes next: the room's writer queues the publish, then tells the actor,
and the payload is on its way to the other servers while the actor delivers to
this server's members. One
publisher task per outbox (:func:`publisher_loop`) sends whatever is queued
at once, up to ``_PUBLISH_BATCH`` at a time, and settles each caller's waiter
with the result of its own command. A caller that gave up (its ``timeout_s``
passed) is skipped; a broker that closes fails every waiter still queued or
in flight with BrokerError.

How a batch is sent is the broker's :data:`Send`: on a cluster, redis-py's
pipeline (:func:`pipeline_send`, one per master); on one Redis, the commands
written straight to a connection the publisher keeps (:class:`ConnectionSend`),
which costs a third less CPU per publish than a pipeline of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from . import BrokerError

__all__ = ["ConnectionSend", "Outbox", "Send", "pipeline_send", "publisher_loop", "queue_publish"]

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


# Sends one batch of (channel, payload): one result per item, in order (an
# exception for an item Redis refused); raises when the batch as a whole failed.
Send = Callable[[Sequence[tuple[str, bytes]]], Awaitable[Sequence[Any]]]


def pipeline_send(client: Any, command: str) -> Send:
    """A batch as one redis-py pipeline of ``command`` (on a cluster: one per master,
    sent concurrently; redis-py closes a connection cut off mid-command)."""

    async def send(items: Sequence[tuple[str, bytes]]) -> Sequence[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for channel, payload in items:
                pipe.execute_command(command, channel, payload)
            return list(await pipe.execute(raise_on_error=False))

    return send


class ConnectionSend:
    """A batch written straight to one connection of ``pool`` that the publisher
    keeps, and its replies read in order: what a pipeline does, without its
    per-call machinery. A connection that failed, or was left mid-command (the
    batch timed out or was cancelled), is closed, so its replies can never be
    read as another batch's; the next batch connects again. A batch that found
    its connection dead (Redis restarted) is sent once more on a fresh one: a
    PUBLISH may then arrive twice, which receivers drop by seq."""

    def __init__(self, pool: Any, command: str) -> None:
        self._pool = pool
        self._command = command
        self._conn: Any = None

    async def __call__(self, items: Sequence[tuple[str, bytes]]) -> Sequence[Any]:
        for attempt in range(2):
            if self._conn is None:
                self._conn = await self._pool.get_connection()
            conn = self._conn
            try:
                packed = conn.pack_commands([(self._command, ch, data) for ch, data in items])
                await conn.send_packed_command(packed, check_health=False)
                results: list[Any] = []
                for _ in items:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:  # that command's own error reply
                        results.append(exc)
                return results
            except RedisConnectionError:
                await self.drop()
                if attempt:
                    raise
            except BaseException:
                await self.drop()  # mid-command: its replies are out of step
                raise
        raise AssertionError("unreachable")

    async def drop(self) -> None:
        """Close the kept connection (it goes back to the pool, disconnected)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)


async def publisher_loop(outbox: Outbox, send: Send, timeout_s: float | None) -> None:
    """Send queued publishes, everything queued at once in one batch (``send``), each
    batch bounded by ``timeout_s`` (None: by the client's own socket timeout, as
    on a cluster)."""
    while True:
        batch = [await outbox.get()]
        while len(batch) < _PUBLISH_BATCH and not outbox.empty():
            batch.append(outbox.get_nowait())
        batch = [item for item in batch if not item[2].done()]  # given up by the caller
        if not batch:
            continue
        try:
            async with asyncio.timeout(timeout_s):
                results = await send([(channel, payload) for channel, payload, _ in batch])
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
