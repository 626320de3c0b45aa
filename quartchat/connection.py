"""One client socket: a bounded outbound queue and the one task that writes it.

Room actors call :meth:`Connection.send` (or :meth:`Connection.deliver` for a
run of room messages) and never wait. When nothing is queued and the writer is
not mid-send, a frame goes straight to the socket's transport as prepared
bytes (``fastsend.DirectWriter``); otherwise it is queued for the writer task,
so a frame never overtakes one queued before it. A socket whose queue is full
is closed with 4008 (slow consumer) and its queued frames dropped, so one slow
reader can never stall a room. Replays, which may be long, use
:meth:`Connection.wait_for_space` for flow control instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import metrics
from .errors import ChatError, CloseCode
from .fastsend import DirectWriter, FastSender, prepare
from .flag import Flag
from .protocol import encode

__all__ = ["Connection", "SlowConsumerLog", "TokenBucket", "WebSocketLike"]

log = logging.getLogger(__name__)

_BATCH = 256  # most frames written in one go by the fast path


class WebSocketLike(Protocol):
    """What the writer needs of a socket (Quart's websocket, or a test fake)."""

    async def send(self, data: str) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; rate 0 means unlimited."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False when none is left."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SlowConsumerLog:
    """At most one log line per ``interval`` s for 4008 closes, however many happen.

    A room's fan-out may close thousands of sockets in one pass; a line each
    would cost more than the fan-out. The first close of a quiet period is
    logged at once; later ones are counted and summed up in one line when the
    interval ends (metrics.SLOW_CONSUMER_CLOSES counts every one).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.pending = 0
        self._last = -interval
        self._flush: asyncio.TimerHandle | None = None

    def closed(self, conn: Connection) -> None:
        now = time.monotonic()
        if self._flush is None and now - self._last >= self.interval:
            self._last = now
            log.warning(
                "slow consumer closed (4008)",
                extra={"conn_id": conn.conn_id, "sender_id": conn.sender_id},
            )
            return
        self.pending += 1
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a unit test): the next close in a loop reports the count
            self._flush = loop.call_later(max(0.0, self._last + self.interval - now), self._report)

    def _report(self) -> None:
        self._flush = None
        if self.pending:
            self._last = time.monotonic()
            log.warning(
                "%d more slow consumers closed (4008) in the last %.0f s",
                self.pending,
                self.interval,
            )
            self.pending = 0


_SLOW_LOG = SlowConsumerLog()


class Connection:
    """A client's socket as the rooms see it."""

    def __init__(self, conn_id: str, sender_id: str, *, queue_size: int) -> None:
        self.conn_id = conn_id
        self.sender_id = sender_id
        self.rooms: set[str] = set()  # joined rooms, kept by the route in frame order
        self.queue_size = queue_size
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self._frames: deque[str] = deque()
        self._wakeup = Flag()
        self._space = Flag(True)
        self._flush_on_close = False
        self._closed = Flag()
        self._writer: asyncio.Task[None] | None = None
        self._sending = False
        self._interrupted = False
        self._direct: DirectWriter | None = None  # set by run_writer on the fast path
        self.on_close: Callable[[], None] | None = None  # the session's, told once on close

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} sender={self.sender_id}>"

    @property
    def open(self) -> bool:
        return self.close_code is None

    def send(self, frame: str) -> bool:
        """Send or queue an encoded frame; on overflow close with 4008. Never blocks."""
        if self.close_code is not None:
            return False
        direct = self._direct
        if (
            direct is not None
            and not self._frames
            and not self._sending
            and direct.write(prepare(frame))
        ):
            metrics.FRAMES_DIRECT.inc()
            return True
        return self._enqueue(frame)

    def deliver(self, frames: Sequence[str], start: int, wire: Callable[[int], bytes]) -> int:
        """Send ``frames[start:]`` in order: one transport write of ``wire(start)``
        (their prepared bytes, which the caller builds once for every socket
        starting there) when the direct path is free, else queued one by one.
        Returns how many were sent or queued (fewer when the queue overflowed)."""
        if self.close_code is not None:
            return 0
        direct = self._direct
        if (
            direct is not None
            and not self._frames
            and not self._sending
            and direct.write(wire(start))
        ):
            metrics.FRAMES_DIRECT.inc(len(frames) - start)
            return len(frames) - start
        for i in range(start, len(frames)):
            if not self._enqueue(frames[i]):
                return i - start
        return len(frames) - start

    def _enqueue(self, frame: str) -> bool:
        if len(self._frames) >= self.queue_size:
            metrics.SLOW_CONSUMER_CLOSES.inc()
            _SLOW_LOG.closed(self)  # a count, and at most one line a second
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue overflowed")
            return False
        self._frames.append(frame)
        metrics.FRAMES_QUEUED.inc()
        if len(self._frames) >= self.queue_size // 2:
            self._space.clear()
        self._wakeup.set()
        return True

    def send_frame(self, frame: dict[str, Any]) -> bool:
        """Encode and queue a frame."""
        return self.send(encode(frame))

    def send_error(self, error: ChatError) -> bool:
        """Queue an ``error`` frame."""
        metrics.ERRORS_SENT.labels(code=error.code).inc()
        return self.send(encode(error.to_frame()))

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Ask the writer to close the socket; 1001 flushes queued frames first."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._direct = None
        self._flush_on_close = code == CloseCode.GOING_AWAY
        if not self._flush_on_close:
            self._frames.clear()
        self._space.set()  # release replays waiting for room: they will see the close
        self._wakeup.set()
        if self._sending and not self._flush_on_close and self._writer is not None:
            # The writer is stuck sending to a reader that does not read: interrupt it.
            self._interrupted = True
            self._writer.cancel()
        if self.on_close is not None:
            self.on_close()

    async def wait_for_space(self) -> bool:
        """Wait until the queue is at most half full; False if the socket is closing."""
        while self.close_code is None and not self._space.is_set():
            await self._space.wait()
        return self.close_code is None

    async def wait_closed(self) -> None:
        """Return once the writer has finished (socket closed or gone)."""
        await self._closed.wait()

    @property
    def queued(self) -> int:
        return len(self._frames)

    async def run_writer(self, ws: WebSocketLike, fast: FastSender | None = None) -> None:
        """Write queued frames in order until closed; then close the socket.

        With ``fast``, every frame queued at the moment goes out in one socket
        write (up to _BATCH frames), and frames sent while nothing is queued
        skip the queue (:meth:`send`); otherwise one ``ws.send`` per frame.
        """
        frames = self._frames
        self._writer = asyncio.current_task()
        if fast is not None and self.close_code is None:
            self._direct = fast.direct()
        try:
            while True:
                while not frames and self.close_code is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self.close_code is not None and not (self._flush_on_close and frames):
                    break
                self._sending = True
                try:
                    if fast is not None:
                        batch = [frames.popleft() for _ in range(min(len(frames), _BATCH))]
                        if not await fast.send_many(batch):
                            frames.extendleft(reversed(batch))
                            fast = None  # the stream is closing: the plain path says how
                            self._direct = None
                            continue
                    else:
                        await ws.send(frames.popleft())
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._interrupted and task is not None and task.uncancel() == 0:
                        break  # close() interrupted a stalled send: go on to close
                    raise
                finally:
                    self._sending = False
                if not self._space.is_set() and len(frames) < self.queue_size // 2:
                    self._space.set()
            assert self.close_code is not None
            await ws.close(self.close_code, self.close_reason)
        finally:
            # A finished (often cancelled) writer task keeps its exception, whose
            # traceback holds this frame and so the socket's whole object graph:
            # a Connection still referenced (a room's last batch) must not keep it.
            self._writer = None
            self._direct = None
            self._closed.set()
