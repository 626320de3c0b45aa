"""The room actor: the one owner of a room's state on this process.

One asyncio task per active room reads an inbox of commands (from routes)
and deliveries (from the broker). It never awaits the store or the broker on
the delivery path: store writes run in its flusher task, reads (history,
replays, gap fills) in helper tasks it owns, and results come back through
the inbox. Per room it guarantees:

- a message is stored before it is published, acked or delivered;
- local members get messages strictly by seq, each once: a message ahead of
  the next expected seq is held, a gap is read from the store after
  ``gap_timeout_s``, and a seq that never reached the store is skipped after
  ``skip_timeout_s``;
- a join with ``since_seq`` replays from the store, then continues live with
  no gap and no duplicate (live frames are buffered while the replay runs).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from . import metrics
from .broker import Broker, BrokerError
from .connection import Connection
from .errors import CLOSE_SLOW_CONSUMER, ChatError
from .events import MessageEvent, SkipEvent, decode_events, encode_events  # TEMP(broker): PresenceEvent unused
from .protocol import encode, message_frame
from .store import DuplicateError, Store, StoredMessage, StoreError

__all__ = [
    "RoomConfig",
    "Join",
    "Leave",
    "Publish",
    "History",
    "Deliver",
    "RoomActor",
    "page_json",
]

log = logging.getLogger(__name__)

_FILL_PAGE = 500
_REPLAY_PAGE = 200
_SYNC_RETRY_S = 1.0
_SYNC_WINDOW = 64  # newest stored seqs checked for in-flight holes when a room starts
_WRITE_ATTEMPTS = 3


@attrs.frozen
class RoomConfig:
    """The settings a room actor uses."""

    batch_max: int = 500
    inbox_max: int = 10000
    replay_max: int = 10000
    idle_s: float = 30.0
    gap_timeout_s: float = 0.2
    skip_timeout_s: float = 5.0
    inflight_s: float = 6.0  # longest a taken seq can still be committed (store op timeout + 1 s)


# Commands, from routes (through the hub).
@attrs.frozen(eq=False)
class Join:
    """A connection joins; replay ``since_seq`` or the last ``history`` messages."""

    conn: Connection
    since_seq: int | None = None
    history: int | None = None


@attrs.frozen(eq=False)
class Leave:
    """A connection leaves; ``quiet`` when it disconnected (no ``left`` frame)."""

    conn: Connection
    quiet: bool = False


@attrs.frozen(eq=False)
class Publish:
    """A connection posts a message."""

    conn: Connection
    content: str
    client_msg_id: str | None = None


@attrs.frozen(eq=False)
class History:
    """A connection asks for a page of history."""

    conn: Connection
    before_seq: int | None
    limit: int


@attrs.frozen(eq=False)
class Deliver:
    """A broker payload for this room; None means payloads may have been lost."""

    payload: bytes | None


# Internal messages, from the actor's own helper tasks.
@attrs.frozen(eq=False)
class _ReplayDone:
    sub: _Sub
    upto: int


@attrs.frozen(eq=False)
class _Filled:
    rows: Sequence[StoredMessage]
    complete: bool  # the read covered everything up to its bound
    final: bool  # the last try before skipping what is still missing
    failed: bool = False  # the store could not be read
    backfill: bool = False  # an open-ended catch-up, not a gap


@attrs.frozen(eq=False)
class _Stop:
    pass


@attrs.frozen(eq=False)
class _Barrier:
    reached: asyncio.Future[None]


_Item = Join | Leave | Publish | History | Deliver | _ReplayDone | _Filled | _Stop | _Barrier


@attrs.define(eq=False)
class _Sub:
    """A local connection in the room; ``backlog`` holds live frames during a replay."""

    conn: Connection
    replaying: bool = False
    backlog: list[tuple[int, str]] = attrs.Factory(list)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _encode_row(row: StoredMessage) -> str:
    return encode(
        message_frame(
            room_id=row.room_id,
            seq=row.seq,
            id=row.id,
            sender_id=row.sender_id,
            content=row.content,
            sent_at_ms=row.sent_at_ms,
            client_msg_id=row.client_msg_id,
        )
    )


def page_json(room_id: str, rows: Sequence[StoredMessage], has_more: bool, *,
              frame_type: str | None = None) -> str:
    """A history page as JSON text, each stored row encoded like its ``message`` frame.

    Shared by the ``history`` frame and ``GET /api/rooms/<id>/messages``; the
    text is assembled so each row is encoded once.
    """
    head = f'"type":{encode(frame_type)},' if frame_type else ""
    body = ",".join(_encode_row(row) for row in rows)
    return (f'{{{head}"room_id":{encode(room_id)},"messages":[{body}],'
            f'"has_more":{"true" if has_more else "false"}}}')


def _ack(row: StoredMessage) -> dict[str, Any]:
    return {
        "type": "ack",
        "room_id": row.room_id,
        "seq": row.seq,
        "id": row.id,
        "client_msg_id": row.client_msg_id,
    }


class RoomActor:
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
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._subs: dict[Connection, _Sub] = {}
        self._senders: Counter[str] = Counter()
        self._temp_seq: int | None = None  # TEMP(broker): in-process seq counter
        self.last_seq: int | None = None  # newest seq delivered (or skipped); None until synced
        self._held: dict[int, tuple[int, str] | None] = {}  # reorder buffer: seq -> (sent_ms, frame)|skip
        self._gap_since: float | None = None
        self._filling = False
        self._fill_tried = False
        self._fill_final_done = False
        self._need_backfill = False
        self._backfill_at: float | None = None
        self._pending: list[Publish] = []
        self._work = asyncio.Event()
        self._writing = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._helpers: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_active = time.monotonic()
        self._next_sync = 0.0
        self._stopping = False

    # ---- owner's interface (the hub) ----------------------------------

    def start(self) -> None:
        """Start the actor task (the hub owns it)."""
        self._task = asyncio.create_task(self._run(), name=f"room:{self.room_id}")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def offer(self, item: Join | Leave | Publish | History) -> None:
        """Queue a command; a full inbox refuses posts and history, never joins or leaves."""
        if isinstance(item, Publish | History):
            if self._stopping or self._inbox.qsize() + len(self._pending) >= self.config.inbox_max:
                raise ChatError("unavailable", "room is overloaded; retry later")
        self._inbox.put_nowait(item)

    def on_broker(self, payload: bytes | None) -> None:
        """Broker handler: never blocks; a full inbox drops and backfills from the store."""
        if payload is not None and self._inbox.qsize() >= self.config.inbox_max:
            metrics.BROKER_DROPPED.inc()
            self._need_backfill = True
            return
        self._inbox.put_nowait(Deliver(payload))

    async def wait_idle(self) -> None:
        """Return once every accepted post has been written (or refused) and answered."""
        if not self._pending and not self._writing:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    async def settle(self) -> None:
        """Return once everything queued before this call has been handled."""
        if self._task is None or self._task.done():
            return
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Barrier(reached))
        await asyncio.wait([reached, self._task], return_when=asyncio.FIRST_COMPLETED)

    async def stop(self) -> None:
        """Write what is pending, then end the task."""
        if self._task is None or self._task.done():
            return
        self._stopping = True
        self._inbox.put_nowait(_Stop())
        await asyncio.shield(self._task)

    @property
    def member_count(self) -> int:
        return len(self._subs)

    # ---- the loop -------------------------------------------------------

    async def _run(self) -> None:
        metrics.ACTIVE_ROOMS.inc()
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"room-writer:{self.room_id}")
        subscribed = False
        try:
            await self.broker.subscribe(self.room_id, self.on_broker)
            subscribed = True
            await self._sync()
            while True:
                item = await self._next_item()
                if item is None:
                    if self._should_retire():
                        return
                    continue
                if isinstance(item, _Stop):
                    await self.wait_idle()
                    return
                if isinstance(item, _Barrier):
                    if not item.reached.done():
                        item.reached.set_result(None)
                    continue
                metrics.INBOX_DEPTH.observe(self._inbox.qsize())
                try:
                    await self._handle(item)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug in one command must not take the room down with it.
                    log.exception("room actor failed on %s", type(item).__name__,
                                  extra={"room_id": self.room_id})
                    conn = getattr(item, "conn", None)
                    if isinstance(conn, Connection):
                        conn.send_error(ChatError("internal", "internal error", room_id=self.room_id))
        finally:
            await self._shutdown(subscribed)

    async def _shutdown(self, subscribed: bool) -> None:
        self._stopping = True
        if self._flusher is not None:
            self._flusher.cancel()
        for task in list(self._helpers):
            task.cancel()
        tasks = [t for t in [self._flusher, *self._helpers] if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for waiter in self._idle_waiters:
            if not waiter.done():
                waiter.set_result(None)
        # Members still here (shutdown) leave presence so other servers see them go.
        for sender in list(self._senders):
            self.broker.presence.leave(self.room_id, sender)  # TEMP(broker): queued, announced by the broker
        self._senders.clear()
        if subscribed:
            try:
                await self.broker.unsubscribe(self.room_id, self.on_broker)
            except Exception:
                log.warning("unsubscribe failed", extra={"room_id": self.room_id})
        metrics.ACTIVE_ROOMS.dec()

    async def _next_item(self) -> _Item | None:
        """The next inbox item, or None when a timer (gap, skip, retire, resync) is due."""
        if self._need_backfill and not self._filling:
            self._need_backfill = False
            self._start_fill(hi=None, final=False)
        try:
            return self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            pass
        delay = self._timer_delay()
        try:
            async with asyncio.timeout(delay):
                return await self._inbox.get()
        except TimeoutError:
            await self._on_timer()
            return None

    def _timer_delay(self) -> float | None:
        now = time.monotonic()
        delays: list[float] = []
        if self.last_seq is None:
            delays.append(self._next_sync - now)
        if self._backfill_at is not None:
            delays.append(self._backfill_at - now)
        if self._held and self._gap_since is not None and not self._filling:
            if self._fill_final_done:
                delays.append(0.0)
            else:
                deadline = self._gap_since + (
                    self.config.gap_timeout_s if not self._fill_tried else self.config.skip_timeout_s
                )
                delays.append(deadline - now)
        if self._retirable():
            delays.append(self._last_active + self.config.idle_s - now)
        if not delays:
            return None
        return max(0.0, min(delays))

    async def _on_timer(self) -> None:
        now = time.monotonic()
        if self._backfill_at is not None and now >= self._backfill_at:
            self._backfill_at = None
            self._need_backfill = True
        if self.last_seq is None and now >= self._next_sync:
            await self._sync()
        if self._held and self._gap_since is not None and not self._filling:
            if self._fill_final_done:
                self._skip_to_held()
            elif not self._fill_tried and now >= self._gap_since + self.config.gap_timeout_s:
                self._fill_tried = True
                self._start_fill(hi=min(self._held) - 1, final=False)
            elif self._fill_tried and now >= self._gap_since + self.config.skip_timeout_s:
                self._start_fill(hi=min(self._held) - 1, final=True)

    def _retirable(self) -> bool:
        return (
            self._on_retire is not None
            and not self._subs
            and not self._pending
            and not self._writing
            and not self._helpers
            and not self._held
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

    async def _sync(self) -> None:
        """Learn where live delivery starts: the newest stored seq, unless a
        lower seq may still be in flight.

        Servers commit a room's seqs in parallel, so seq 10 can be stored while
        seq 9 (taken by another process a moment earlier) is not yet. Starting
        at 10 would drop 9 when it arrives. So a hole among the newest stored
        seqs that is younger than a write can take starts delivery below it:
        the rows above it are held and go out in order once the hole is
        filled (or, if it never reaches the store, skipped).
        """
        try:
            last = await self.store.max_seq(self.room_id)
            recent = await self.store.after(
                self.room_id, max(0, last - _SYNC_WINDOW), last, _SYNC_WINDOW
            )
        except StoreError as exc:
            log.warning("room cannot read its last seq: %s", exc, extra={"room_id": self.room_id})
            metrics.STORE_ERRORS.labels(op="max_seq").inc()
            self._next_sync = time.monotonic() + _SYNC_RETRY_S
            return
        if self.last_seq is not None:
            return
        base = last
        young = _now_ms() - int(self.config.inflight_s * 1000)
        expected = max(0, last - _SYNC_WINDOW) + 1
        for row in recent:
            if row.seq > expected and row.sent_at_ms >= young:
                base = expected - 1  # seqs expected..row.seq-1 may be in flight
                break
            expected = row.seq + 1
        self.last_seq = base
        # Anything held while unsynced at or below `base` is already stored.
        for seq in [s for s in self._held if s <= base]:
            del self._held[seq]
        for row in recent:
            if row.seq > base and row.seq not in self._held:
                self._held[row.seq] = (row.sent_at_ms, _encode_row(row))
        if self._held and self._gap_since is None and min(self._held) > base + 1:
            self._gap_since = time.monotonic()
        self._drain_held()

    async def _handle(self, item: _Item) -> None:
        if isinstance(item, Deliver):
            self._on_deliver(item.payload)  # TEMP(broker): the broker re-adds presence itself
            return
        self._last_active = time.monotonic()
        if isinstance(item, Publish):
            self._on_publish(item)
        elif isinstance(item, Join):
            await self._on_join(item)
        elif isinstance(item, Leave):
            await self._on_leave(item)
        elif isinstance(item, History):
            self._spawn(self._history(item))
        elif isinstance(item, _ReplayDone):
            self._on_replay_done(item)
        elif isinstance(item, _Filled):
            self._on_filled(item)

    # ---- membership -----------------------------------------------------

    async def _on_join(self, cmd: Join) -> None:
        conn = cmd.conn
        if not conn.open:
            return
        if self.last_seq is None:
            conn.rooms.discard(self.room_id)
            conn.send_error(ChatError("unavailable", "storage unavailable; retry the join later",
                                      action="join", room_id=self.room_id))
            return
        if conn in self._subs:
            conn.send_frame(await self._joined_frame())
            return
        sub = _Sub(conn)
        self._subs[conn] = sub
        sender = conn.sender_id
        self._senders[sender] += 1
        if self._senders[sender] == 1:
            self.broker.presence.join(self.room_id, sender)  # TEMP(broker): queued, never blocks
        conn.send_frame(await self._joined_frame())
        upto = self.last_seq
        if cmd.since_seq is not None:
            if cmd.since_seq < upto:
                after = max(cmd.since_seq, upto - self.config.replay_max)
                sub.replaying = True
                self._spawn(self._replay(sub, after=after, upto=upto))
        elif cmd.history:
            sub.replaying = True
            self._spawn(self._replay(sub, after=None, upto=upto, newest=cmd.history))

    async def _joined_frame(self) -> dict[str, Any]:
        try:
            members = await self.broker.presence.members(self.room_id)
        except BrokerError:
            members = sorted(self._senders)
        return {"type": "joined", "room_id": self.room_id, "last_seq": self.last_seq,
                "members": members}

    async def _on_leave(self, cmd: Leave) -> None:
        conn = cmd.conn
        sub = self._subs.pop(conn, None)
        if sub is None:
            if not cmd.quiet:
                conn.send_error(ChatError("not_joined", "not joined to this room",
                                          action="leave", room_id=self.room_id))
            return
        if not cmd.quiet:
            conn.send_frame({"type": "left", "room_id": self.room_id})
        sender = conn.sender_id
        self._senders[sender] -= 1
        if self._senders[sender] <= 0:
            del self._senders[sender]
            self.broker.presence.leave(self.room_id, sender)  # TEMP(broker): queued, announced by the broker

    # ---- delivery -------------------------------------------------------

    def _on_deliver(self, payload: bytes | None) -> None:
        if payload is None:
            # The broker may have lost payloads (reconnect): catch up from the store.
            if self._filling:
                self._need_backfill = True
            else:
                self._start_fill(hi=None, final=False)
            return
        for event in decode_events(payload):
            if isinstance(event, MessageEvent):
                self._on_message(event.seq, (event.sent_ms, event.frame))
            elif isinstance(event, SkipEvent):
                self._on_message(event.seq, None)
            else:
                for conn, sub in self._subs.items():
                    if conn.sender_id != event.sender_id and not sub.replaying:
                        conn.send(event.frame)

    def _on_message(self, seq: int, item: tuple[int, str] | None) -> None:
        last = self.last_seq
        if last is None:
            self._held[seq] = item
            return
        if seq <= last:
            return  # already delivered (a replayed publish, a gap fill racing the broker)
        if seq == last + 1:
            self._emit(seq, item)
            self._drain_held()
            return
        if seq not in self._held:
            metrics.REORDER_HOLDS.inc()
            self._held[seq] = item
            if len(self._held) > self.config.inbox_max:
                # The gap is not filling and the buffer must stay bounded: read it now.
                self._fill_tried = True
                if not self._filling:
                    self._start_fill(hi=min(self._held) - 1, final=True)
        elif item is not None:
            self._held[seq] = item
        if self._gap_since is None:
            self._gap_since = time.monotonic()
            self._fill_tried = False
            self._fill_final_done = False

    def _drain_held(self) -> None:
        assert self.last_seq is not None
        held = self._held
        while self.last_seq + 1 in held:
            seq = self.last_seq + 1
            self._emit(seq, held.pop(seq))
        if not held:
            self._gap_since = None
        elif self._gap_since is not None:
            # A new gap starts now; it gets its own timeouts.
            self._gap_since = time.monotonic()
            self._fill_tried = False
            self._fill_final_done = False

    def _emit(self, seq: int, item: tuple[int, str] | None) -> None:
        self.last_seq = seq
        if item is None:
            return
        sent_ms, frame = item
        count = 0
        for conn, sub in self._subs.items():
            if sub.replaying:
                # Live frames wait behind the replay, bounded like the socket's queue.
                if len(sub.backlog) >= conn.queue_size:
                    metrics.SLOW_CONSUMER_CLOSES.inc()
                    conn.close(CLOSE_SLOW_CONSUMER, "slow consumer: replay fell behind")
                else:
                    sub.backlog.append((seq, frame))
            elif conn.send(frame):
                count += 1
        if count:
            metrics.MESSAGES_DELIVERED.inc(count)
            metrics.DELIVERY_LATENCY.observe(max(0.0, (_now_ms() - sent_ms) / 1000))

    def _skip_to_held(self) -> None:
        """Give up on seqs below the lowest held one: they never reached the store."""
        assert self.last_seq is not None
        target = min(self._held) - 1
        skipped = target - self.last_seq
        if skipped > 0:
            metrics.SKIPPED_SEQS.inc(skipped)
            log.warning("skipping %d seqs that never reached the store", skipped,
                        extra={"room_id": self.room_id})
            self.last_seq = target
        self._fill_final_done = False
        self._drain_held()

    def _start_fill(self, *, hi: int | None, final: bool) -> None:
        if self.last_seq is None:
            return
        self._filling = True
        self._spawn(self._fill(self.last_seq, hi, final))

    async def _fill(self, lo: int, hi: int | None, final: bool) -> None:
        limit = _FILL_PAGE if hi is None else max(1, min(hi - lo, _FILL_PAGE))
        try:
            rows = await self.store.after(self.room_id, lo, hi, limit)
        except StoreError as exc:
            log.warning("gap fill failed: %s", exc, extra={"room_id": self.room_id})
            metrics.STORE_ERRORS.labels(op="fill").inc()
            self._inbox.put_nowait(_Filled([], False, final, failed=True, backfill=hi is None))
            return
        complete = len(rows) < limit or (hi is not None and hi - lo <= limit)
        self._inbox.put_nowait(_Filled(rows, complete, final, backfill=hi is None))

    def _on_filled(self, msg: _Filled) -> None:
        self._filling = False
        if msg.failed:
            # Never skip on a failed read: what is missing may be in the store.
            now = time.monotonic()
            if msg.backfill:
                self._backfill_at = now + _SYNC_RETRY_S
            elif self._gap_since is not None:
                # Try the final read again in a second.
                self._fill_tried = True
                self._gap_since = now - self.config.skip_timeout_s + _SYNC_RETRY_S
            return
        if msg.rows:
            metrics.GAP_FILLS.inc(len(msg.rows))
        for row in msg.rows:
            self._on_message(row.seq, (row.sent_at_ms, _encode_row(row)))
        if not msg.complete and msg.rows:
            self._need_backfill = True  # more to read: the next loop turn continues
        elif msg.final and self._held:
            self._fill_final_done = True

    # ---- replay and history ---------------------------------------------

    async def _replay(self, sub: _Sub, *, after: int | None, upto: int, newest: int | None = None) -> None:
        conn = sub.conn
        sent = 0
        try:
            if newest is not None:
                rows, _ = await self.store.page(self.room_id, upto + 1, newest)
                for row in rows:
                    conn.send(_encode_row(row))
                sent = len(rows)
            else:
                cursor = after if after is not None else 0
                page = max(1, min(_REPLAY_PAGE, conn.queue_size // 2))
                while cursor < upto:
                    rows = await self.store.after(self.room_id, cursor, upto, page)
                    if not rows:
                        break
                    if not await conn.wait_for_space():
                        return
                    for row in rows:
                        conn.send(_encode_row(row))
                    sent += len(rows)
                    cursor = rows[-1].seq
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="replay").inc()
            log.warning("replay failed: %s", exc, extra={"room_id": self.room_id})
            conn.send_error(ChatError("unavailable", "storage unavailable; replay incomplete, "
                                      "rejoin with since_seq", action="join", room_id=self.room_id))
        finally:
            metrics.REPLAYED_MESSAGES.inc(sent)
            self._inbox.put_nowait(_ReplayDone(sub, upto))

    def _on_replay_done(self, msg: _ReplayDone) -> None:
        sub = msg.sub
        sub.replaying = False
        backlog, sub.backlog = sub.backlog, []
        if self._subs.get(sub.conn) is not sub:
            return  # left during the replay
        for seq, frame in backlog:
            if seq > msg.upto:
                sub.conn.send(frame)

    async def _history(self, cmd: History) -> None:
        try:
            rows, has_more = await self.store.page(self.room_id, cmd.before_seq, cmd.limit)
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="history").inc()
            log.warning("history failed: %s", exc, extra={"room_id": self.room_id})
            cmd.conn.send_error(ChatError("unavailable", "storage unavailable; retry later",
                                          action="history", room_id=self.room_id))
            return
        cmd.conn.send(page_json(self.room_id, rows, has_more, frame_type="history"))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._helpers.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._helpers.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("room helper failed", exc_info=t.exception(),
                          extra={"room_id": self.room_id})

        task.add_done_callback(done)

    # ---- publishing -----------------------------------------------------

    def _on_publish(self, cmd: Publish) -> None:
        if cmd.conn not in self._subs:
            cmd.conn.send_error(ChatError("not_joined", "join the room before posting",
                                          action="message", room_id=self.room_id,
                                          client_msg_id=cmd.client_msg_id))
            return
        self._pending.append(cmd)
        self._work.set()

    async def _flush_loop(self) -> None:
        """The writer: takes pending posts in batches, stores, publishes, acks."""
        while True:
            await self._work.wait()
            self._work.clear()
            while self._pending:
                batch = self._pending[: self.config.batch_max]
                del self._pending[: self.config.batch_max]
                self._writing = True
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("room write failed", extra={"room_id": self.room_id})
                    self._refuse(batch, "internal", "internal error; nothing was stored")
                finally:
                    self._writing = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _refuse(self, batch: Sequence[Publish], code: str, message: str) -> None:
        for cmd in batch:
            cmd.conn.send_error(ChatError(code, message, action="message", room_id=self.room_id,
                                          client_msg_id=cmd.client_msg_id))

    async def _max_seq(self) -> int:
        return await self.store.max_seq(self.room_id)

    # TEMP(broker): a stand-in sequencer until the store assigns seqs (room rewrite).
    async def _next_seqs(self, count: int) -> int:
        if self._temp_seq is None:
            self._temp_seq = await self._max_seq()
        self._temp_seq += count
        return self._temp_seq

    async def _reseed(self) -> None:  # TEMP(broker)
        self._temp_seq = max(self._temp_seq or 0, await self._max_seq())

    async def _write(self, batch: list[Publish]) -> None:
        """Store a batch in seq order, then publish it and ack each sender."""
        answered: dict[int, StoredMessage] = {}  # index in batch -> stored row (retries)
        originals: dict[int, StoredMessage] = {}  # seq -> stored row found for a retry
        rows: list[StoredMessage] = []
        owners: list[list[int]] = []  # indexes in batch answered by each row
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                rows, owners = await self._prepare(batch, answered, originals)
                if rows:
                    started = time.perf_counter()
                    await self.store.insert(rows)
                    metrics.STORE_WRITE_LATENCY.observe(time.perf_counter() - started)
                    metrics.STORE_BATCH_SIZE.observe(len(rows))
                    metrics.MESSAGES_STORED.inc(len(rows))
                break
            except DuplicateError as exc:
                # A retry raced us from another server, or the sequencer lost its
                # state and reused seqs: release the seqs, re-seed, and try again.
                log.warning("duplicate on insert (attempt %d): %s", attempt + 1, exc,
                            extra={"room_id": self.room_id})
                await self._release(rows)
                rows, owners = [], []
                try:
                    await self._reseed()  # TEMP(broker): in-process counter
                except StoreError as reseed_exc:
                    log.warning("reseed failed: %s", reseed_exc, extra={"room_id": self.room_id})
            except (StoreError, BrokerError) as exc:
                metrics.STORE_ERRORS.labels(op="insert").inc()
                log.warning("cannot store %d messages: %s", len(batch), exc,
                            extra={"room_id": self.room_id})
                # No skip notice for the seqs: an insert that failed on a broken
                # connection may still have committed. Receivers read the gap
                # from the store (the truth) and skip only what is not there.
                self._refuse([c for i, c in enumerate(batch) if i not in answered],
                             "unavailable", "storage unavailable; retry later with the same "
                             "client_msg_id")
                self._ack_answered(batch, answered)
                return
        else:
            self._refuse([c for i, c in enumerate(batch) if i not in answered],
                         "unavailable", "could not store the message; retry later")
            self._ack_answered(batch, answered)
            return

        # A retry's original is published again: members who have it drop it by
        # seq, and members who never got it (its first insert failed after
        # committing, so nobody published it) get it now.
        out = sorted([*rows, *originals.values()], key=lambda r: r.seq)
        if out:
            events = [MessageEvent(r.seq, r.sent_at_ms, _encode_row(r)) for r in out]
            payload = encode_events(events)
            try:
                await self.broker.publish(self.room_id, payload)
                metrics.MESSAGES_PUBLISHED.inc(len(rows))
            except BrokerError as exc:
                # Stored, so not lost: other servers fill the gap from the store;
                # local members get it straight away.
                log.warning("publish failed: %s", exc, extra={"room_id": self.room_id})
                self.on_broker(payload)
        for row, indexes in zip(rows, owners):
            for index in indexes:
                answered[index] = row
        self._ack_answered(batch, answered)

    def _ack_answered(self, batch: Sequence[Publish], answered: dict[int, StoredMessage]) -> None:
        for index, row in answered.items():
            batch[index].conn.send_frame(_ack(row))

    async def _prepare(
        self, batch: Sequence[Publish], answered: dict[int, StoredMessage],
        originals: dict[int, StoredMessage],
    ) -> tuple[list[StoredMessage], list[list[int]]]:
        """Resolve retries against the store, then take seqs for the new messages."""
        keys = {
            (cmd.conn.sender_id, cmd.client_msg_id)
            for i, cmd in enumerate(batch)
            if cmd.client_msg_id is not None and i not in answered
        }
        found = await self.store.find_client_ids(self.room_id, sorted(keys)) if keys else {}
        fresh: list[int] = []
        first_of: dict[tuple[str, str], int] = {}
        duplicates_in_batch: list[tuple[int, int]] = []
        for i, cmd in enumerate(batch):
            if i in answered:
                continue
            if cmd.client_msg_id is None:
                fresh.append(i)
                continue
            key = (cmd.conn.sender_id, cmd.client_msg_id)
            if key in found:
                answered[i] = found[key]
                originals[found[key].seq] = found[key]
            elif key in first_of:
                duplicates_in_batch.append((i, first_of[key]))
            else:
                first_of[key] = i
                fresh.append(i)
        if not fresh:
            return [], []
        last = await self._next_seqs(len(fresh))  # TEMP(broker): in-process counter
        first = last - len(fresh) + 1
        now = _now_ms()
        rows = [
            StoredMessage(
                room_id=self.room_id,
                seq=first + n,
                id=uuid.uuid4().hex,
                sender_id=batch[i].conn.sender_id,
                content=batch[i].content,
                client_msg_id=batch[i].client_msg_id,
                sent_at_ms=now,
            )
            for n, i in enumerate(fresh)
        ]
        owners = [[i] for i in fresh]
        # A retry inside the same batch is answered like its first copy.
        position = {i: n for n, i in enumerate(fresh)}
        for dup, original in duplicates_in_batch:
            owners[position[original]].append(dup)
        return rows, owners

    async def _release(self, rows: Sequence[StoredMessage]) -> None:
        """Tell every server that these seqs will never be stored."""
        seqs = sorted({r.seq for r in rows})
        if not seqs:
            return
        payload = encode_events([SkipEvent(s) for s in seqs])
        try:
            await self.broker.publish(self.room_id, payload)
        except BrokerError:
            self.on_broker(payload)
