"""The room actor: the one owner of a room's state on this process.

One asyncio task per active room reads an inbox of commands (from routes,
through the hub), broker deliveries, and the reports of the helper tasks it
owns. It never awaits the store or the broker itself: the writer stores and
publishes (:mod:`.writer`), replays read for their member (:mod:`.replay`),
and store reads for the ordering (:mod:`.ordering`), the start-up read and
the presence view are helper tasks reporting back through the inbox. So a
slow database or Redis delays those, never the delivery of what has arrived.

Per room it guarantees: a message is stored before it is acked or
delivered; every member gets messages strictly by seq, each once; a join
with ``since_seq`` continues exactly after it; posts accepted before a drain
are stored and acked before the socket is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import attrs

from .. import metrics
from ..broker import Broker, BrokerError
from ..connection import Connection
from ..errors import ChatError, Echo
from ..store import Store
from . import commands as c
from .handlers import RETRY_S, RoomHandlers, answer
from .members import Members
from .ordering import Ordering
from .writer import Writer

__all__ = ["RoomActor", "RoomConfig"]

log = logging.getLogger(__name__)


@attrs.frozen
class RoomConfig:
    """The settings a room actor uses."""

    batch_max: int = 500
    inbox_max: int = 10000
    idle_s: float = 30.0
    gap_timeout_s: float = 0.2


class RoomActor(RoomHandlers):
    """One active room on this process."""

    def __init__(
        self,
        room_id: str,
        *,
        store: Store,
        broker: Broker,
        config: RoomConfig,
        on_retire: Callable[[RoomActor], bool] | None = None,
    ) -> None:
        self.room_id = room_id
        self.store = store
        self.broker = broker
        self.config = config
        self._on_retire = on_retire
        self._inbox: asyncio.Queue[c.Item] = asyncio.Queue()
        self._external = 0  # commands from outside in the inbox (bounded by inbox_max)
        self.order = Ordering(max_held=config.inbox_max)
        self.members = Members()
        self._waiting: list[c.Join] = []  # joins that arrived before the start-up read
        self.writer = Writer(
            room_id,
            store=store,
            broker=broker,
            batch_max=config.batch_max,
            report=self._inbox.put_nowait,
        )
        self._helpers: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_active = time.monotonic()
        self._sync_at: float | None = 0.0  # when to (re)try the start-up read; None: done
        self._stopping = False

    # ---- the owner's interface (the hub) ----------------------------------

    def start(self) -> None:
        """Start the actor task (the hub owns it)."""
        self._task = asyncio.create_task(self._run(), name=f"room:{self.room_id}")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def delivered(self) -> int | None:
        """The newest seq handed out on this process; None before the start-up read."""
        return self.order.delivered

    def offer(self, item: c.Join | c.Leave | c.Post) -> None:
        """Queue a command. A full room refuses posts and joins (``unavailable``),
        never a leave."""
        full = self._stopping or self._external + self.writer.pending >= self.config.inbox_max
        if full and not isinstance(item, c.Leave):
            raise ChatError("unavailable", "room is overloaded; retry later")
        self._external += 1
        self._inbox.put_nowait(item)

    def on_broker(self, payload: bytes | None) -> None:
        """Broker handler: never blocks. A full inbox drops the payload and reads the
        store instead (everything published is stored first)."""
        if payload is not None and self._inbox.qsize() >= self.config.inbox_max:
            metrics.BROKER_DROPPED.inc()
            payload = None
        self._inbox.put_nowait(c.Deliver(payload))

    def hint(self, last_seq: int) -> None:
        """The store's counter for this room (the hub's position check)."""
        if self.order.started and last_seq > (self.order.delivered or 0):
            self._inbox.put_nowait(c.Hint(last_seq))

    async def settle(self) -> None:
        """Return once everything queued before this call has been handled."""
        if self._task is None or self._task.done():
            return
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(c.Barrier(reached))
        await asyncio.wait([reached, self._task], return_when=asyncio.FIRST_COMPLETED)

    async def quiesce(self) -> None:
        """Handle what is queued, write and ack every accepted post (for a drain;
        the caller bounds the wait: a room whose store is down never gets there)."""
        while self._task is not None and not self._task.done():
            await self.settle()
            if not self.writer.busy:
                return
            if not self.order.started:
                await asyncio.sleep(0.01)  # the start-up read is still out
                continue
            await self.writer.wait_idle()

    async def stop(self) -> None:
        """Write what is pending, then end the task."""
        if self._task is None or self._task.done():
            return
        self._stopping = True
        self._inbox.put_nowait(c.Stop())
        await asyncio.shield(self._task)

    # ---- the loop ----------------------------------------------------------

    async def _run(self) -> None:
        metrics.ACTIVE_ROOMS.inc()
        writer = asyncio.create_task(self.writer.run(), name=f"room-writer:{self.room_id}")
        subscribed = False
        try:
            # Subscribe before the start-up read: whatever is committed after the
            # read began reaches us by the broker (or the position check).
            await self.broker.subscribe(self.room_id, self.on_broker)
            subscribed = True
            self._spawn(self._read_view())
            while True:
                item = await self._next()
                if item is None:
                    if self._should_retire():
                        return
                    continue
                if isinstance(item, c.Stop):
                    if not self.order.started:  # never synced: the posts cannot be written
                        for cmd in self.writer.take_pending():
                            error = cmd.echo(self.room_id).error(
                                "unavailable", "storage unavailable; retry later"
                            )
                            answer(cmd, error)
                    await self.writer.wait_idle()
                    while not self._inbox.empty():  # the last batches' acks
                        last = self._inbox.get_nowait()
                        if isinstance(last, c.Written):
                            self._on_written(last)
                    return
                try:
                    self._handle(item)
                except Exception:
                    # A bug in one command must not take the room down with it.
                    log.exception(
                        "room actor failed on %s",
                        type(item).__name__,
                        extra={"room_id": self.room_id},
                    )
                    conn = getattr(item, "conn", None)
                    if isinstance(conn, Connection):
                        # Echoes the command it answers, like every error.
                        echo = (
                            item.echo(self.room_id)
                            if isinstance(item, c.Join | c.Leave | c.Post)
                            else Echo(room_id=self.room_id)
                        )
                        conn.send_error(echo.error("internal", "internal error"))
        finally:
            self._stopping = True
            writer.cancel()
            for task in list(self._helpers):
                task.cancel()
            await asyncio.gather(writer, *self._helpers, return_exceptions=True)
            for sender in self.members.local_senders():
                self.broker.presence.leave(self.room_id, sender)
            if subscribed:
                try:
                    await self.broker.unsubscribe(self.room_id, self.on_broker)
                except BrokerError:
                    log.warning("unsubscribe failed", extra={"room_id": self.room_id})
            metrics.ACTIVE_ROOMS.dec()

    async def _next(self) -> c.Item | None:
        """The next inbox item, or None when a timer (read, retire) is due."""
        self._start_due_work()
        try:
            item = self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            delay = self._timer_delay()
            if delay is None:  # no timer: no Timeout to build (most waits of a busy room)
                item = await self._inbox.get()
            else:
                try:
                    async with asyncio.timeout(delay):
                        item = await self._inbox.get()
                except TimeoutError:
                    return None
        if isinstance(item, c.Join | c.Leave | c.Post):
            self._external -= 1
            metrics.INBOX_DEPTH.observe(self._inbox.qsize())
        return item

    def _timer_delay(self) -> float | None:
        now = time.monotonic()
        delays = []
        if self._sync_at is not None:
            delays.append(self._sync_at - now)
        read = self.order.due(now, self.config.gap_timeout_s)
        if read is not None:
            delays.append(read)
        if self._retirable():
            delays.append(self._last_active + self.config.idle_s - now)
        return max(0.0, min(delays)) if delays else None

    def _start_due_work(self) -> None:
        now = time.monotonic()
        if self._sync_at is not None and now >= self._sync_at:
            self._sync_at = float("inf")  # in flight
            self._spawn(self._read_counter())
        read = self.order.next_read(now, self.config.gap_timeout_s)
        if read is not None:
            self._spawn(self._read(read.after, read.upto))

    def _retirable(self) -> bool:
        return (
            self._on_retire is not None
            and not self.members
            and not self._waiting
            and not self.writer.busy
            and not self._helpers
            and not self.order.held
            and self._external == 0
        )

    def _should_retire(self) -> bool:
        if not self._retirable() or not self._inbox.empty():
            return False
        if time.monotonic() < self._last_active + self.config.idle_s:
            return False
        assert self._on_retire is not None
        # Synchronous with the check above: once the hub forgets us, no route
        # can reach this inbox any more, so nothing is lost.
        return self._on_retire(self)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._helpers.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._helpers.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error(
                    "room helper failed", exc_info=t.exception(), extra={"room_id": self.room_id}
                )

        task.add_done_callback(done)
        return task

    # ---- dispatch ------------------------------------------------------------

    def _handle(self, item: c.Item) -> None:
        now = time.monotonic()
        if isinstance(item, c.Deliver):
            self._on_deliver(item.payload, now)
            return
        if isinstance(item, c.Join | c.Leave | c.Post):
            self._last_active = now
        if isinstance(item, c.Post):
            self._on_post(item)
        elif isinstance(item, c.Join):
            self._on_join(item)
        elif isinstance(item, c.Leave):
            self._on_leave(item)
        elif isinstance(item, c.Written):
            self._on_written(item)
        elif isinstance(item, c.Read):
            self._on_read(item, now)
        elif isinstance(item, c.Hint):
            self.order.hint(item.last_seq)
        elif isinstance(item, c.Synced):
            self._on_synced(item.last_seq, now)
        elif isinstance(item, c.SyncFailed):
            self._sync_at = now + RETRY_S
        elif isinstance(item, c.View):
            self._on_view(item)
        elif isinstance(item, c.ReplayDone):
            self._on_replay_done(item.member)
        elif isinstance(item, c.Clamp):
            self._on_clamp(item.member, item.last_seq, item.floor)
        elif isinstance(item, c.Barrier) and not item.reached.done():
            item.reached.set_result(None)
