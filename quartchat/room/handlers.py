"""What a room actor does with each item of its inbox: membership, replays,
delivery by seq, posts and their acks. The loop that feeds these, and the
actor's lifecycle, are in :mod:`.actor`.

Everything here runs in the actor's own task and never awaits: I/O goes to
helper tasks (the coroutines below), which report back through the inbox.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Coroutine
from typing import Any, cast

from .. import metrics
from ..broker import Broker, BrokerError
from ..errors import ChatError, ErrorCode
from ..events import MessageEvent, PresenceEvent, PresenceKind, decode_events
from ..fastsend import prepare
from ..protocol import encode
from ..store import Store, StoreError
from . import commands as c
from .frames import ack_frame, encode_row, joined_frame, left_frame, presence_frame
from .members import Member, Members
from .ordering import Entry, Ordering
from .replay import replay
from .writer import Writer, now_ms

__all__ = ["RoomHandlers"]

log = logging.getLogger(__name__)

READ_PAGE = 500
REPLAY_PAGE = 200
RETRY_S = 1.0  # a failed start-up read or store read is tried again after this
VIEW_WAIT_S = 2.0  # the presence read at start-up is given up after this


class RoomHandlers:
    """The room's state and what each inbox item does to it (the actor's half without the loop)."""

    room_id: str
    store: Store
    broker: Broker
    order: Ordering
    members: Members
    writer: Writer
    _inbox: asyncio.Queue[c.Item]
    _waiting: list[c.Join]
    _sync_at: float | None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        raise NotImplementedError  # the actor owns its helper tasks

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

    async def _read_view(self, refresh: bool = False) -> None:
        presence = self.broker.presence
        try:
            async with asyncio.timeout(VIEW_WAIT_S):
                senders = await presence.members(self.room_id)
            if not refresh:
                self._inbox.put_nowait(c.View(senders))
                return
            # Right after an outage Redis may not yet hold what live servers are about
            # to re-assert (their entries expired while it was away, and each server
            # refreshes them on its next heartbeat): read again after one, and take as
            # changed only what both reads agree on.
            await asyncio.sleep(getattr(presence, "heartbeat_s", 0.0) + 1.0)
            async with asyncio.timeout(VIEW_WAIT_S):
                again = await presence.members(self.room_id)
        except (BrokerError, TimeoutError) as exc:  # best effort: local members still count
            log.info("presence view unavailable: %s", exc, extra={"room_id": self.room_id})
            return
        both = sorted(set(senders) & set(again))
        self._inbox.put_nowait(c.View(both, True, sorted(set(senders) | set(again))))

    def _on_view(self, view: c.View) -> None:
        if not view.refresh:
            self.members.seen(view.senders)
            return
        # Presence events published while the broker was away are lost: tell the
        # members what changed meanwhile, as the events would have.
        came, went = self.members.refresh(view.senders, view.maybe)
        for sender in came:
            self._announce(sender, "join")
        for sender in went:
            self._announce(sender, "leave")

    def _announce(self, sender: str, event: PresenceKind) -> None:
        """Send the ``presence`` frame of ``sender``'s join or leave to every other member.

        The one place a presence frame is built: for the broker's presence
        events and for what a refreshed view found changed."""
        frame = encode(presence_frame(self.room_id, sender, event))
        for member in self.members:
            if member.conn.sender_id != sender:
                member.conn.send(frame)

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
                # server): nothing up to it is sent, unless it is beyond the room
                # itself. Not live until the store says which: a live frame skipped
                # now could not be told apart from one the client really saw.
                member.cursor = cmd.since_seq
                member.live = False
                floor = max(delivered, self.order.known)  # committed before this join
                member.replay = self._spawn(self._clamp(member, floor))
        elif cmd.history:
            self._start_replay(member, newest=cmd.history)

    async def _clamp(self, member: Member, floor: int) -> None:
        backoff = RETRY_S / 4
        while True:
            try:
                last = await self.store.max_seq(self.room_id)
            except StoreError:
                await asyncio.sleep(backoff)  # the member waits; nothing is lost
                backoff = min(backoff * 2, 5.0)
                continue
            self._inbox.put_nowait(c.Clamp(member, last, floor))
            return

    def _on_clamp(self, member: object, last_seq: int, floor: int) -> None:
        if not isinstance(member, Member) or self.members.get(member.conn) is not member:
            return
        if member.cursor > last_seq:
            # since_seq is beyond the room's newest seq: the client's position is
            # not real. Continue after what was committed before it joined (what
            # came later, it gets: better a message twice than one missed).
            member.cursor = min(floor, last_seq)
        self._start_replay(member)  # what came after the cursor meanwhile, then live

    def _on_leave(self, cmd: c.Leave) -> None:
        conn = cmd.conn
        self._waiting = [j for j in self._waiting if j.conn is not conn]
        member, last_here = self.members.remove(conn)
        if member is None:
            if not cmd.quiet:
                conn.send_error(
                    cmd.echo(self.room_id).error("not_joined", "not joined to this room")
                )
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
                await replay(
                    self.store,
                    self.room_id,
                    member,
                    self._delivered_now,
                    page=REPLAY_PAGE,
                    newest=newest,
                )
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
            # The broker may have lost payloads (a reconnect): catch up from the
            # store, and re-read presence (its events are not stored).
            self.order.hint(None)
            self._spawn(self._read_view(refresh=True))
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
        self.members.presence(event.sender_id, event.event)
        self._announce(event.sender_id, event.event)

    def _on_read(self, msg: c.Read, now: float) -> None:
        if msg.failed:
            self.order.read_failed(now, RETRY_S)
            return
        if msg.rows:
            metrics.GAP_FILLS.inc(len(msg.rows))
        before = self.order.skipped
        entries = [Entry(r.seq, r.sent_at_ms, encode_row(r)) for r in msg.rows]
        self._emit(self.order.read_done(entries, msg.covered, msg.target, now))
        if self.order.skipped > before:
            metrics.SKIPPED_SEQS.inc(self.order.skipped - before)
            log.warning(
                "passed over %d seqs the store does not hold",
                self.order.skipped - before,
                extra={"room_id": self.room_id},
            )

    async def _read(self, after: int, upto: int | None) -> None:
        try:
            if upto is None:
                upto = await self.store.max_seq(self.room_id)
            rows = (
                await self.store.after(self.room_id, after, upto, READ_PAGE) if upto > after else []
            )
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="fill").inc()
            log.warning("store read failed: %s", exc, extra={"room_id": self.room_id})
            self._inbox.put_nowait(c.Read([], after, after, after, failed=True))
            return
        # A full page covers the range up to its last row; the rest is read next.
        covered = upto if len(rows) < READ_PAGE else rows[-1].seq
        self._inbox.put_nowait(c.Read(rows, after, covered, upto))

    def _emit(self, entries: list[Entry]) -> None:
        """Send entries (in seq order) to every live member above its cursor.

        A member gets the run of entries above its cursor in one call; the
        prepared bytes of a run are built once for every member starting at
        the same entry (most start at the first), so a direct write costs one
        transport write per socket and no encoding.
        """
        if not entries:
            return
        seqs = [entry.seq for entry in entries]
        frames = [entry.frame for entry in entries]
        first, last = seqs[0], seqs[-1]
        prepared: list[bytes | None] = [None] * len(entries)
        runs: dict[int, bytes] = {}

        def wire(start: int) -> bytes:
            run = runs.get(start)
            if run is None:
                for i in range(start, len(entries)):
                    if prepared[i] is None:
                        prepared[i] = prepare(frames[i])
                run = runs[start] = b"".join(cast("list[bytes]", prepared[start:]))
            return run

        delivered = direct = 0
        earliest = len(entries)  # first entry that reached anyone
        for member in self.members:
            cursor = member.cursor
            if not member.live or cursor >= last:
                continue
            start = 0 if cursor < first else bisect.bisect_right(seqs, cursor)
            member.cursor = last
            sent, written = member.conn.deliver(frames, start, wire)
            if sent:
                delivered += sent
                if written:
                    direct += sent
                earliest = min(earliest, start)
        if delivered:
            metrics.MESSAGES_DELIVERED.inc(delivered)
            if direct:
                metrics.FRAMES_DIRECT.inc(direct)
            now = now_ms()
            for entry in entries[earliest:]:
                metrics.DELIVERY_LATENCY.observe(max(0.0, (now - entry.sent_ms) / 1000))

    # ---- posting ------------------------------------------------------------------

    def _on_post(self, cmd: c.Post) -> None:
        conn = cmd.conn
        if (
            conn is not None
            and self.members.get(conn) is None
            and not any(j.conn is conn for j in self._waiting)
        ):
            conn.send_error(
                cmd.echo(self.room_id).error("not_joined", "join the room before posting")
            )
            return
        self.writer.add(cmd)

    def _on_written(self, msg: c.Written) -> None:
        if msg.answers is None:
            code: ErrorCode = "internal" if msg.error == "internal" else "unavailable"
            text = "internal error; nothing was stored" if code == "internal" else str(msg.error)
            for cmd in msg.batch:
                answer(cmd, cmd.echo(self.room_id).error(code, text))
            return
        # Local members get the batch now; the broker's copy is a duplicate here.
        self._emit([e for entry in msg.entries for e in self.order.offer(entry, time.monotonic())])
        for cmd, result in zip(msg.batch, msg.answers):
            if cmd.reply is not None:
                if not cmd.reply.done():
                    cmd.reply.set_result((result.row, result.created))
            elif cmd.conn is not None:
                cmd.conn.send_frame(ack_frame(result.row))


def answer(cmd: c.Post, error: ChatError) -> None:
    """Refuse a post: an error frame, or the server API's reply."""
    if cmd.reply is not None:
        if not cmd.reply.done():
            cmd.reply.set_exception(error)
    elif cmd.conn is not None:
        cmd.conn.send_error(error)
