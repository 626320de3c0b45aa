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
import orjson

from .. import metrics
from ..broker import Broker
from ..connection import Connection
from ..errors import ChatError
from ..events import MessageEvent, PresenceEvent, decode_events
from ..store import Store, StoreError
from . import commands as c
from .frames import ack_frame, encode_row, joined_frame, left_frame
from .members import Member, Members
from .ordering import Entry, Ordering
from .replay import replay
from .writer import Writer, now_ms

__all__ = ["RoomActor", "RoomConfig"]

log = logging.getLogger(__name__)

_READ_PAGE = 500
_REPLAY_PAGE = 200
_RETRY_S = 1.0  # a failed start-up read or store read is tried again after this
_VIEW_WAIT_S = 2.0  # the presence read at start-up is given up after this


@attrs.frozen
class RoomConfig:
    """The settings a room actor uses."""

    batch_max: int = 500
    inbox_max: int = 10000
    idle_s: float = 30.0
    gap_timeout_s: float = 0.2


class RoomActor:
    """One active room on this process."""

    def __init__(self, room_id: str, *, store: Store, broker: Broker, config: RoomConfig,
                 on_retire: Callable[[RoomActor], bool] | None = None) -> None:
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
        self.writer = Writer(room_id, store=store, broker=broker, batch_max=config.batch_max,
                             report=self._inbox.put_nowait)
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

    def offer(self, item: c.Join | c.Leave | c.Publish) -> None:
        """Queue a command. A full room refuses posts and joins (``unavailable``),
        never a leave."""
        if not isinstance(item, c.Leave):
            if self._stopping or self._external + self.writer.pending >= self.config.inbox_max:
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
                            _answer(cmd, ChatError("unavailable", "storage unavailable; retry "
                                                   "later", action="message",
                                                   room_id=self.room_id,
                                                   client_msg_id=cmd.client_msg_id))
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
                    log.exception("room actor failed on %s", type(item).__name__,
                                  extra={"room_id": self.room_id})
                    conn = getattr(item, "conn", None)
                    if isinstance(conn, Connection):
                        conn.send_error(ChatError("internal", "internal error",
                                                  room_id=self.room_id))
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
                except Exception:
                    log.warning("unsubscribe failed", extra={"room_id": self.room_id})
            metrics.ACTIVE_ROOMS.dec()

    async def _next(self) -> c.Item | None:
        """The next inbox item, or None when a timer (read, retire) is due."""
        self._start_due_work()
        try:
            item = self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(self._timer_delay()):
                    item = await self._inbox.get()
            except TimeoutError:
                return None
        if isinstance(item, c.Join | c.Leave | c.Publish):
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
        return (self._on_retire is not None and not self.members and not self._waiting
                and not self.writer.busy and not self._helpers and not self.order.held
                and self._external == 0)

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
                log.error("room helper failed", exc_info=t.exception(),
                          extra={"room_id": self.room_id})

        task.add_done_callback(done)
        return task

    # ---- dispatch ------------------------------------------------------------

    def _handle(self, item: c.Item) -> None:
        now = time.monotonic()
        if isinstance(item, c.Deliver):
            self._on_deliver(item.payload, now)
            return
        if isinstance(item, c.Join | c.Leave | c.Publish):
            self._last_active = now
        if isinstance(item, c.Publish):
            self._on_publish(item)
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
            self._sync_at = now + _RETRY_S
        elif isinstance(item, c.View):
            self.members.seen(item.senders)
        elif isinstance(item, c.ReplayDone):
            self._on_replay_done(item.member)
        elif isinstance(item, c.Clamp):
            self._on_clamp(item.member, item.last_seq)
        elif isinstance(item, c.Barrier):
            if not item.reached.done():
                item.reached.set_result(None)

    # ---- start-up ------------------------------------------------------------

    async def _read_counter(self) -> None:
        try:
            last = await self.store.max_seq(self.room_id)
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="max_seq").inc()
            log.warning("room cannot read its last seq: %s", exc, extra={"room_id": self.room_id})
            self._inbox.put_nowait(c.SyncFailed())
            return
        self._inbox.put_nowait(c.Synced(last))

    async def _read_view(self) -> None:
        try:
            async with asyncio.timeout(_VIEW_WAIT_S):
                senders = await self.broker.presence.members(self.room_id)
        except Exception as exc:  # presence is best effort: local members still count
            log.info("presence view unavailable: %s", exc, extra={"room_id": self.room_id})
            return
        self._inbox.put_nowait(c.View(senders))

    def _on_synced(self, last_seq: int, now: float) -> None:
        self._sync_at = None
        # Posts wait for this read: a post stored before it would be at or below
        # `last_seq`, where live delivery does not go.
        self.writer.open()
        # Nothing was delivered yet and nobody is a member: what the start skips
        # is what was stored before anyone here joined.
        self._emit(self.order.start(last_seq, now))
        waiting, self._waiting = self._waiting, []
        for join in waiting:
            self._on_join(join)

    # ---- membership ----------------------------------------------------------

    def _on_join(self, cmd: c.Join) -> None:
        conn = cmd.conn
        if not conn.open:
            return
        delivered = self.order.delivered
        if delivered is None:
            self._waiting.append(cmd)  # answered once the start-up read is in
            return
        if self.members.get(conn) is not None:
            conn.send_frame(joined_frame(self.room_id, delivered, self.members.view()))
            return
        member = Member(conn, cursor=delivered)
        if self.members.add(member):
            self.broker.presence.join(self.room_id, conn.sender_id)
        conn.send_frame(joined_frame(self.room_id, delivered, self.members.view()))
        if cmd.since_seq is not None:
            if cmd.since_seq < delivered:
                member.cursor = cmd.since_seq
                self._start_replay(member)
            elif cmd.since_seq > delivered:
                # Ahead of this process (held behind a hole, or seen on another
                # server): skip up to it, unless it is beyond the room itself.
                member.cursor = cmd.since_seq
                self._spawn(self._clamp(member, cmd.since_seq))
        elif cmd.history:
            self._start_replay(member, newest=cmd.history)

    async def _clamp(self, member: Member, since_seq: int) -> None:
        try:
            last = await self.store.max_seq(self.room_id)
        except StoreError:
            return  # the cursor stays at since_seq: nothing is sent twice
        if last < since_seq:
            self._inbox.put_nowait(c.Clamp(member, last))

    def _on_clamp(self, member: object, last_seq: int) -> None:
        if not isinstance(member, Member) or self.members.get(member.conn) is not member:
            return
        if member.cursor > last_seq:
            # since_seq was beyond the room's newest seq: continue from that instead.
            member.cursor = last_seq
            if member.live and (self.order.delivered or 0) > last_seq:
                self._start_replay(member)

    def _on_leave(self, cmd: c.Leave) -> None:
        conn = cmd.conn
        self._waiting = [j for j in self._waiting if j.conn is not conn]
        member, last_here = self.members.remove(conn)
        if member is None:
            if not cmd.quiet:
                conn.send_error(ChatError("not_joined", "not joined to this room",
                                          action="leave", room_id=self.room_id))
            return
        if member.replay is not None:
            member.replay.cancel()  # no replayed frame may follow `left`
        if not cmd.quiet:
            conn.send_frame(left_frame(self.room_id, cmd.reason))
        if last_here:
            self.broker.presence.leave(self.room_id, conn.sender_id)

    # ---- replay ---------------------------------------------------------------

    def _start_replay(self, member: Member, *, newest: int | None = None) -> None:
        member.live = False

        async def run() -> None:
            try:
                await replay(self.store, self.room_id, member, self._delivered_now,
                             page=_REPLAY_PAGE, newest=newest)
            finally:
                self._inbox.put_nowait(c.ReplayDone(member))

        member.replay = self._spawn(run())

    def _delivered_now(self) -> int:
        return self.order.delivered or 0

    def _on_replay_done(self, member: object) -> None:
        if not isinstance(member, Member) or self.members.get(member.conn) is not member:
            return  # it left meanwhile
        member.replay = None
        if not member.conn.open:
            return
        if member.cursor >= self._delivered_now():
            member.live = True
        else:
            self._start_replay(member)  # the room moved on during the replay

    # ---- delivery ---------------------------------------------------------------

    def _on_deliver(self, payload: bytes | None, now: float) -> None:
        if payload is None:
            # The broker may have lost payloads (a reconnect): catch up from the store.
            self.order.hint(None)
            return
        entries: list[Entry] = []
        holds = self.order.holds
        for event in decode_events(payload):
            if isinstance(event, MessageEvent):
                entries += self.order.offer(Entry(event.seq, event.sent_ms, event.frame), now)
            elif isinstance(event, PresenceEvent):
                self._emit(entries)
                entries = []
                self._on_presence(event)
        self._emit(entries)
        if self.order.holds > holds:
            metrics.REORDER_HOLDS.inc(self.order.holds - holds)

    def _on_presence(self, event: PresenceEvent) -> None:
        try:
            kind = orjson.loads(event.frame).get("event")
        except (orjson.JSONDecodeError, AttributeError):
            return
        self.members.presence(event.sender_id, str(kind))
        for member in self.members:
            if member.conn.sender_id != event.sender_id:
                member.conn.send(event.frame)

    def _on_read(self, msg: c.Read, now: float) -> None:
        if msg.failed:
            self.order.read_failed(now, _RETRY_S)
            return
        if msg.rows:
            metrics.GAP_FILLS.inc(len(msg.rows))
        before = self.order.skipped
        entries = [Entry(r.seq, r.sent_at_ms, encode_row(r)) for r in msg.rows]
        self._emit(self.order.read_done(entries, msg.covered, msg.target, now))
        if self.order.skipped > before:
            metrics.SKIPPED_SEQS.inc(self.order.skipped - before)
            log.warning("passed over %d seqs the store does not hold",
                        self.order.skipped - before, extra={"room_id": self.room_id})

    async def _read(self, after: int, upto: int | None) -> None:
        try:
            if upto is None:
                upto = await self.store.max_seq(self.room_id)
            rows = await self.store.after(self.room_id, after, upto, _READ_PAGE) \
                if upto > after else []
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="fill").inc()
            log.warning("store read failed: %s", exc, extra={"room_id": self.room_id})
            self._inbox.put_nowait(c.Read([], after, after, after, failed=True))
            return
        # A full page covers the range up to its last row; the rest is read next.
        covered = upto if len(rows) < _READ_PAGE else rows[-1].seq
        self._inbox.put_nowait(c.Read(rows, after, covered, upto))

    def _emit(self, entries: list[Entry]) -> None:
        """Send entries (in seq order) to every live member above its cursor."""
        if not entries:
            return
        members = list(self.members)
        for entry in entries:
            seq, frame = entry.seq, entry.frame
            count = 0
            for member in members:
                if member.live and seq > member.cursor:
                    member.cursor = seq
                    if member.conn.send(frame):
                        count += 1
            if count:
                metrics.MESSAGES_DELIVERED.inc(count)
                metrics.DELIVERY_LATENCY.observe(max(0.0, (now_ms() - entry.sent_ms) / 1000))

    # ---- posting ------------------------------------------------------------------

    def _on_publish(self, cmd: c.Publish) -> None:
        conn = cmd.conn
        if conn is not None and self.members.get(conn) is None and not any(
                j.conn is conn for j in self._waiting):
            conn.send_error(ChatError("not_joined", "join the room before posting",
                                      action="message", room_id=self.room_id,
                                      client_msg_id=cmd.client_msg_id))
            return
        self.writer.add(cmd)

    def _on_written(self, msg: c.Written) -> None:
        if msg.answers is None:
            code = "internal" if msg.error == "internal" else "unavailable"
            text = "internal error; nothing was stored" if code == "internal" else str(msg.error)
            for cmd in msg.batch:
                _answer(cmd, ChatError(code, text, action="message", room_id=self.room_id,
                                       client_msg_id=cmd.client_msg_id))
            return
        # Local members get the batch now; the broker's copy is a duplicate here.
        self._emit([e for entry in msg.entries for e in
                    self.order.offer(entry, time.monotonic())])
        for cmd, answer in zip(msg.batch, msg.answers):
            if cmd.reply is not None:
                if not cmd.reply.done():
                    cmd.reply.set_result((answer.row, answer.created))
            elif cmd.conn is not None:
                cmd.conn.send_frame(ack_frame(answer.row))


def _answer(cmd: c.Publish, error: ChatError) -> None:
    if cmd.reply is not None:
        if not cmd.reply.done():
            cmd.reply.set_exception(error)
    elif cmd.conn is not None:
        cmd.conn.send_error(error)
