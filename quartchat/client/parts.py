"""The values the asyncio client hands out and keeps: posts with their state,
per-room positions, the pacing that follows the server's rate limit, and the
reconnect backoff."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import attrs

__all__ = ["Pace", "Post", "PostFailed", "Room", "backoff_delay", "stop_task"]

log = logging.getLogger(__name__)

TokenSource = Callable[[], Awaitable[str]]


def backoff_delay(
    attempt: int, initial: float, maximum: float, rnd: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with equal jitter.

    The delay is in [cap/2, cap], where cap = min(maximum, initial * 2**attempt).
    """
    cap = min(maximum, initial * 2 ** min(attempt, 30))
    return float(cap / 2 + rnd() * cap / 2)


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end.

    Unlike ``cancel(); with suppress(CancelledError): await task``, a
    cancellation of the *caller* while it waits is not swallowed: it still
    reaches the caller, so a client task cancelled from outside really ends.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        log.warning("quartchat client: %s ended with %r", task.get_name(), task.exception())


class PostFailed(Exception):
    """A post the server refused for good (``too_large``, ``invalid_field``, ``forbidden``...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.define(eq=False)
class Post:
    """One message you posted: ``pending`` until acked (``sent``, with its seq), or ``failed``."""

    room_id: str
    content: str
    client_msg_id: str
    state: str = "pending"
    seq: int | None = None
    id: str | None = None
    error: PostFailed | None = None
    attempts: int = 0
    sent_at: float | None = None  # loop time of the last send on this connection
    retry_at: float | None = None
    _done: asyncio.Event = attrs.field(factory=asyncio.Event)

    async def wait(self, timeout: float | None = None) -> Post:
        """Wait until acked (returns self) or failed (raises PostFailed)."""
        async with asyncio.timeout(timeout):
            await self._done.wait()
        if self.error is not None:
            raise self.error
        return self


@attrs.define(eq=False)
class Room:
    room_id: str
    history: int
    last_seq: int | None = None
    baseline: int | None = None  # where a rejoin starts when no message was seen yet
    joined: bool = False
    members: set[str] = attrs.field(factory=set)
    since_sent: int | None = None
    join_at: float | None = None  # loop time of a join retry (after rate_limited / not_joined)


@attrs.define
class Pace:
    """Posts at most the server's ``rate_per_s`` (from welcome), so a burst of posts is
    paced rather than refused; after a ``rate_limited``, nothing is sent until ``hold``."""

    rate: float
    at: float
    tokens: float = 0.0
    hold_until: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.tokens = max(1.0, self.rate)

    def take(self, now: float) -> bool:
        if now < self.hold_until:
            return False
        if self.rate <= 0:
            return True
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def next_at(self, now: float) -> float:
        if now < self.hold_until:
            return self.hold_until
        return now + (1.0 - self.tokens) / self.rate if self.rate > 0 else now

    def hold(self, until: float) -> None:
        self.hold_until = max(self.hold_until, until)
        self.tokens = 0.0
