"""One client socket: a bounded outbound queue and the task that writes it, when needed.

Room actors call :meth:`Connection.send` (or :meth:`Connection.deliver` for a
run of room messages) and never wait. When nothing is queued and the writer is
not mid-send, a frame goes straight to the socket's transport as prepared
bytes (``fastsend.DirectWriter``); otherwise it is queued for the writer task,
so a frame never overtakes one queued before it. The writer task exists only
while there is something to write (queued frames, or the close): most sockets
of a busy server take every frame on the direct path and have none. A socket
whose queue is full is closed with 4008 (slow consumer) and its queued frames
dropped, so one slow reader can never stall a room. Replays, which may be
long, use :meth:`Connection.wait_for_space` for flow control instead.
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

# What a Connection's queue is while nothing is queued: shared, always empty (never
# appended to). A deque costs 760 bytes even when empty, and most sockets never queue.
_NO_FRAMES: deque[str] = deque()


class Connection:
    """A client's socket as the rooms see it."""

    def __init__(self, conn_id: str, sender_id: str, *, queue_size: int) -> None:
        self.conn_id = conn_id
        self.sender_id = sender_id
        self.rooms: set[str] = set()  # joined rooms, kept by the route in frame order
        self.queue_size = queue_size
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self._frames = _NO_FRAMES  # a deque of its own from the first queued frame
        self._space = Flag(True)
        self._flush_on_close = False
        self._closed = Flag()  # the writing is over: the close was sent, or it failed
        self._ws: WebSocketLike | None = None  # set by attach
        self._fast: FastSender | None = None
        self._on_end: Callable[[bool], None] | None = None
        self._writer: asyncio.Task[None] | None = None  # only while there is work
        self._sending = False
        self._interrupted = False
        self._failure: BaseException | None = None
        self._direct: DirectWriter | None = None  # set by attach on the fast path
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

    def deliver(
        self, frames: Sequence[str], start: int, wire: Callable[[int], bytes]
    ) -> tuple[int, bool]:
        """Send ``frames[start:]`` in order: one transport write of ``wire(start)``
        (their prepared bytes, which the caller builds once for every socket
        starting there) when the direct path is free, else queued one by one.
        Returns how many were sent or queued (fewer when the queue overflowed),
        and whether they went the direct way: the caller counts direct frames
        once for the whole room (``FRAMES_DIRECT``), not once per socket."""
        if self.close_code is not None:
            return 0, False
        direct = self._direct
        if (
            direct is not None
            and not self._frames
            and not self._sending
            and direct.write(wire(start))
        ):
            return len(frames) - start, True
        for i in range(start, len(frames)):
            if not self._enqueue(frames[i]):
                return i - start, False
        return len(frames) - start, False

    def _enqueue(self, frame: str) -> bool:
        if len(self._frames) >= self.queue_size:
            metrics.SLOW_CONSUMER_CLOSES.inc()
            _SLOW_LOG.closed(self)  # a count, and at most one line a second
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue overflowed")
            return False
        if self._frames is _NO_FRAMES:
            self._frames = deque()
        self._frames.append(frame)
        metrics.FRAMES_QUEUED.inc()
        if len(self._frames) >= self.queue_size // 2:
            self._space.clear()
        self._kick()
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
        self._kick()
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

    @property
    def writing(self) -> bool:
        """A writer task runs (frames are queued, or the close is being sent)."""
        return self._writer is not None

    def attach(
        self,
        ws: WebSocketLike,
        fast: FastSender | None = None,
        on_end: Callable[[bool], None] | None = None,
    ) -> None:
        """Write to ``ws`` from now on: directly and in batches with ``fast``,
        one ``ws.send`` per frame without. ``on_end(still_open)`` is told once
        when the writing is over: the close was sent (False), or a send failed
        while the socket was open (True)."""
        self._ws = ws
        self._fast = fast
        self._on_end = on_end
        if fast is not None and self.close_code is None:
            self._direct = fast.direct()
        self._kick()

    async def detach(self) -> None:
        """Stop writing (the session is over): a running writer is cancelled."""
        writer = self._writer
        self._direct = None
        self._ws = None
        self._on_end = None
        self._failure = None  # its traceback holds the socket's objects
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            # A writer cancelled before it ran never reached its own finally.
            if self._writer is writer:
                self._writer = None
        self._closed.set()

    async def run_writer(self, ws: WebSocketLike, fast: FastSender | None = None) -> None:
        """:meth:`attach`, then wait until the writing is over (the socket closed, or a
        send failed: raised here); cancelling it :meth:`detach`-es."""
        self.attach(ws, fast)
        try:
            await self._closed.wait()
        finally:
            failure = self._failure
            await self.detach()
        if failure is not None:
            raise failure

    def _kick(self) -> None:
        """Start the writer task if there is work and none runs."""
        if (
            self._writer is None
            and self._ws is not None
            and not self._closed.is_set()
            and (self._frames or self.close_code is not None)
        ):
            self._writer = asyncio.get_running_loop().create_task(
                self._write(self._ws), name=f"writer:{self.conn_id}"
            )

    async def _write(self, ws: WebSocketLike) -> None:
        """Write queued frames in order until none is left (the task ends), or, once
        closed, the close frame (1001 after the queued frames).

        With ``fast``, every frame queued at the moment goes out in one socket
        write (up to _BATCH frames), and frames sent while nothing is queued
        skip the queue (:meth:`send`); otherwise one ``ws.send`` per frame.
        """
        frames = self._frames
        failed: BaseException | None = None
        try:
            while True:
                if self.close_code is not None and not (self._flush_on_close and frames):
                    break
                if not frames:
                    self._frames = _NO_FRAMES  # its deque goes with this task
                    return  # nothing left: the next queued frame starts a writer again
                self._sending = True
                try:
                    fast = self._fast
                    if fast is not None:
                        batch = [frames.popleft() for _ in range(min(len(frames), _BATCH))]
                        if not await fast.send_many(batch):
                            frames.extendleft(reversed(batch))
                            self._fast = None  # the stream is closing: the plain path says how
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
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any send failure ends the writing
            # Kept for run_writer's caller, not raised: nobody awaits this task,
            # and a task's unretrieved exception would be logged as an error.
            log.debug("send failed: %r", exc, extra={"conn_id": self.conn_id})
            failed = exc
        finally:
            # A finished (often cancelled) writer task keeps its exception, whose
            # traceback holds this frame and so the socket's whole object graph:
            # a Connection still referenced (a room's last batch) must not keep it.
            if self._writer is asyncio.current_task():
                self._writer = None
            if self.close_code is not None or failed is not None:
                self._end(failed)

    def _end(self, failed: BaseException | None) -> None:
        """The writing is over: the close was sent, or a send failed."""
        if self._closed.is_set():
            return
        self._failure = failed
        self._direct = None
        self._closed.set()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(failed is not None and self.close_code is None)
