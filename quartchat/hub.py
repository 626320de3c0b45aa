"""The hub: this process's registry of room actors and open connections.

It owns the store and the broker, starts a room's actor on first use, lets an
idle actor retire (and forgets one that died), runs the position check that
heals a lost tail, serves history pages, and runs the graceful drain. Routes
talk only to the hub.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from datetime import UTC, datetime

from . import metrics
from .broker import Broker, BrokerError, create_broker
from .config import Settings
from .connection import Connection
from .errors import ChatError, CloseCode, Echo
from .room import History, Join, Leave, Post, RoomActor, RoomConfig, page_json
from .store import Store, StoredMessage, StoreError, create_store

__all__ = ["ClientTracker", "Hub"]

log = logging.getLogger(__name__)

_CLIENTS_FLUSH_S = 1.0
_CLIENTS_MAX_PENDING = 100_000
_POSITION_BATCH = 500  # rooms per counter query of the position check
_HISTORY_READS = 64  # history pages read at once by this process (more wait)


class ClientTracker:
    """Batches ``clients`` table updates (first_seen / last_seen) off the socket path."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._seen: dict[str, datetime] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def seen(self, sender_id: str) -> None:
        self._seen[sender_id] = datetime.now(UTC).replace(tzinfo=None)
        if len(self._seen) >= _CLIENTS_MAX_PENDING:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="clients-writer")

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(_CLIENTS_FLUSH_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self._seen:
            return
        batch, self._seen = self._seen, {}
        try:
            await self._store.touch_clients(batch)
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="clients").inc()
            log.warning("clients update failed: %s", exc)
            # Keep the newest sightings for the next try, bounded.
            for sender, when in batch.items():
                if len(self._seen) < _CLIENTS_MAX_PENDING:
                    self._seen.setdefault(sender, when)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()


class Hub:
    """Room actors and connections of this process."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.store = (
            store
            if store is not None
            else create_store(settings.database_url, op_timeout=settings.db_timeout_s)
        )
        self.broker = broker if broker is not None else create_broker(settings)
        self.room_config = RoomConfig(
            batch_max=settings.batch_max,
            inbox_max=settings.room_inbox,
            idle_s=settings.room_idle_s,
            gap_timeout_s=settings.gap_timeout_s,
        )
        self.actors: dict[str, RoomActor] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # history reads, owned here
        self._history_slots = asyncio.Semaphore(_HISTORY_READS)
        self._checker: asyncio.Task[None] | None = None
        self.connections: set[Connection] = set()
        self.clients = ClientTracker(self.store)
        self.draining = False

    async def start(self) -> None:
        """Connect the store and the broker (both must answer)."""
        await self.store.connect()
        try:
            await self.broker.start()
        except BaseException:
            await self.store.close()
            raise
        metrics.BROKER_UP.set(1)
        self.clients.start()
        self._checker = asyncio.create_task(self._position_check(), name="position-check")

    # ---- rooms ----------------------------------------------------------

    def actor(self, room_id: str) -> RoomActor:
        """The room's actor, started on first use."""
        actor = self.actors.get(room_id)
        if actor is None:
            actor = RoomActor(
                room_id,
                store=self.store,
                broker=self.broker,
                config=self.room_config,
                on_retire=self._retire,
            )
            self.actors[room_id] = actor
            # Not in the caller's context: a task copies the context it is created
            # in, and a websocket handler's holds Quart's websocket context, i.e.
            # that socket's whole hypercorn connection, for as long as the room lives.
            contextvars.Context().run(actor.start)
            assert actor.task is not None
            actor.task.add_done_callback(lambda _: self._ended(actor))
        return actor

    def _ended(self, actor: RoomActor) -> None:
        """An actor task ended. If it was not retired or stopped, it died: forget it,
        so the next command starts a fresh one, and tell its members to join again."""
        if self.actors.get(actor.room_id) is not actor:
            return
        del self.actors[actor.room_id]
        task = actor.task
        error = None if task is None or task.cancelled() else task.exception()
        log.error("room actor ended unexpectedly", exc_info=error, extra={"room_id": actor.room_id})
        for member in list(actor.members):
            conn = member.conn
            conn.rooms.discard(actor.room_id)
            # Echoes a join: what the client must send again.
            error = Echo("join", actor.room_id).error(
                "internal", "room failed; join again with since_seq"
            )
            conn.send_error(error)
            conn.send_frame({"type": "left", "room_id": actor.room_id, "reason": "error"})

    def _retire(self, actor: RoomActor) -> bool:
        if self.actors.get(actor.room_id) is actor:
            del self.actors[actor.room_id]
        # The actor's task finishes its cleanup on its own; keep it owned until then.
        if actor.task is not None:
            self._retiring.add(actor.task)
            actor.task.add_done_callback(self._retiring.discard)
        return True

    @property
    def retiring(self) -> int:
        """Retired actors whose task is still finishing its cleanup."""
        return len(self._retiring)

    def submit(self, room_id: str, command: Join | Leave | Post | History) -> None:
        """Hand a command to the room; raises ChatError when the room refuses it."""
        if self.draining and isinstance(command, Post | Join | History):
            raise ChatError("unavailable", "server is shutting down; reconnect elsewhere")
        if isinstance(command, History):
            self._history(room_id, command)  # a read: no actor needed
            return
        if isinstance(command, Leave) and room_id not in self.actors:
            if not command.quiet:
                error = command.echo(room_id).error("not_joined", "not joined to this room")
                command.conn.send_error(error)
            return
        self.actor(room_id).offer(command)

    async def post(
        self, room_id: str, sender_id: str, content: str, client_msg_id: str | None
    ) -> tuple[StoredMessage, bool]:
        """Post as ``sender_id`` (the server API): stored, then delivered like any
        post. Returns the row and whether this call stored it (False: a retry)."""
        if self.draining:
            raise ChatError("unavailable", "server is shutting down; retry elsewhere")
        reply: asyncio.Future[tuple[StoredMessage, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        self.actor(room_id).offer(
            Post(None, content, client_msg_id, sender_id=sender_id, reply=reply)
        )
        try:
            # The writer answers within a store operation or two; a lost answer is unavailable.
            async with asyncio.timeout(self.settings.db_timeout_s * 3 + 5):
                return await reply
        except TimeoutError:
            raise ChatError(
                "unavailable", "storage did not answer; retry with the same client_msg_id"
            ) from None

    def _history(self, room_id: str, cmd: History) -> None:
        async def read() -> None:
            async with self._history_slots:
                if not cmd.conn.open:
                    return
                try:
                    rows, has_more = await self.store.page(room_id, cmd.before_seq, cmd.limit)
                except StoreError as exc:
                    metrics.STORE_ERRORS.labels(op="history").inc()
                    log.warning("history failed: %s", exc, extra={"room_id": room_id})
                    error = cmd.echo(room_id).error(
                        "unavailable", "storage unavailable; retry later"
                    )
                    cmd.conn.send_error(error)
                    return
            cmd.conn.send(page_json(room_id, rows, has_more, frame_type="history"))

        task = asyncio.create_task(read(), name=f"history:{room_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _position_check(self) -> None:
        """Every few seconds, compare each active room's delivered seq with the store's
        counter, and let rooms that are behind read the rest (a lost last message,
        a subscription that went deaf, a commit whose reply was lost)."""
        while True:
            await asyncio.sleep(self.settings.position_check_s)
            rooms = [a.room_id for a in self.actors.values() if a.delivered is not None]
            for start in range(0, len(rooms), _POSITION_BATCH):
                chunk = rooms[start : start + _POSITION_BATCH]
                try:
                    counters = await self.store.last_seqs(chunk)
                except StoreError as exc:
                    metrics.STORE_ERRORS.labels(op="position").inc()
                    log.warning("position check failed: %s", exc)
                    break
                for room_id, last in counters.items():
                    actor = self.actors.get(room_id)
                    if actor is not None:
                        actor.hint(last)

    # ---- connections ----------------------------------------------------

    def connected(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.clients.seen(conn.sender_id)
        metrics.CONNECTIONS_OPEN.inc()
        metrics.CONNECTIONS_OPENED.inc()

    def disconnected(self, conn: Connection) -> None:
        """Leave every room the connection was in (quietly) and forget it."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.clients.seen(conn.sender_id)
        metrics.CONNECTIONS_OPEN.dec()
        metrics.CONNECTIONS_CLOSED.labels(code=str(conn.close_code or CloseCode.NORMAL)).inc()
        for room_id in list(conn.rooms):
            actor = self.actors.get(room_id)
            if actor is not None:
                actor.offer(Leave(conn, quiet=True))
        conn.rooms.clear()

    # ---- HTTP views -----------------------------------------------------

    async def rooms(self) -> list[tuple[str, int]]:
        try:
            return await self.broker.presence.rooms()
        except BrokerError as exc:
            raise ChatError("unavailable", f"presence unavailable: {exc}") from exc

    async def members(self, room_id: str) -> list[str]:
        try:
            return await self.broker.presence.members(room_id)
        except BrokerError as exc:
            raise ChatError("unavailable", f"presence unavailable: {exc}") from exc

    async def messages_page(self, room_id: str, before_seq: int | None, limit: int) -> str:
        """A messages page as JSON text (each message encoded like its frame)."""
        try:
            rows, has_more = await self.store.page(room_id, before_seq, limit)
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="history").inc()
            raise ChatError("unavailable", "storage unavailable; retry later") from exc
        return page_json(room_id, rows, has_more)

    async def ready(self) -> dict[str, str]:
        """Check the store and the broker; the dict names what failed."""
        problems: dict[str, str] = {}
        if self.draining:
            problems["server"] = "draining"
        try:
            async with asyncio.timeout(2):
                await self.store.ping()
        except (StoreError, TimeoutError) as exc:
            problems["database"] = str(exc) or "timeout"
        try:
            async with asyncio.timeout(2):
                await self.broker.ping()
        except (BrokerError, TimeoutError) as exc:
            problems["broker"] = str(exc) or "timeout"
        return problems

    # ---- shutdown -------------------------------------------------------

    async def drain(self) -> None:
        """Graceful drain: refuse new work, commit pending posts, close sockets with 1001."""
        if self.draining:
            return
        self.draining = True
        started = time.monotonic()
        timeout = self.settings.drain_timeout_s
        log.info("draining: %d connections, %d rooms", len(self.connections), len(self.actors))
        try:
            async with asyncio.timeout(timeout):
                # Posts already accepted (in an inbox or being written) are
                # written, acked and delivered first; new ones are refused now.
                actors = list(self.actors.values())
                await asyncio.gather(*(a.quiesce() for a in actors))
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        except TimeoutError:
            log.warning("drain: pending writes did not finish in %.1fs", timeout)
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server going away")
        try:
            async with asyncio.timeout(max(0.5, timeout - (time.monotonic() - started))):
                await asyncio.gather(*(c.wait_closed() for c in list(self.connections)))
        except TimeoutError:
            log.warning("drain: some sockets did not flush in time")
        metrics.DRAIN_SECONDS.observe(time.monotonic() - started)

    async def stop(self) -> None:
        """Stop every actor (writing what is pending), then the broker and the store.

        Only a running hub has anything to stop: a second call, or one on a hub
        never started, returns at once (the position check is what runs from
        :meth:`start` to here)."""
        checker, self._checker = self._checker, None
        if checker is None:
            return
        self.draining = True
        checker.cancel()
        await asyncio.gather(checker, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        actors = list(self.actors.values())
        self.actors.clear()
        results = await asyncio.gather(
            *(a.stop() for a in actors), *list(self._retiring), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("room actor stop failed", exc_info=result)
        await self.clients.stop()
        try:
            await self.broker.close()
        finally:
            await self.store.close()
