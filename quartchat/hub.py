"""The hub: this process's registry of room actors and open connections, and
the one object routes talk to.

It owns the store and the broker, starts a room's actor on first use and
hands it commands (:meth:`Hub.submit`), lets an idle actor retire (and
forgets one that died, telling its members to join again), keeps the open
connections, and runs the lifecycle: start, the graceful drain, stop. It
also owns the parts that need no actor: :class:`~quartchat.reads.Reads`
(``hub.reads``: presence, history pages, readiness), the position check
(:mod:`quartchat.position`) and the ``clients`` table
(:class:`~quartchat.clients.ClientTracker`, ``hub.clients``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from . import metrics
from .broker import Broker, create_broker
from .clients import ClientTracker
from .config import Settings
from .connection import Connection
from .errors import ChatError, CloseCode, Echo
from .position import position_check
from .reads import Reads
from .room import History, Join, Leave, Post, RoomActor, RoomConfig
from .store import Store, StoredMessage, create_store

__all__ = ["Hub"]

log = logging.getLogger(__name__)


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
        self._checker: asyncio.Task[None] | None = None  # the position check, while running
        self.connections: set[Connection] = set()
        self.clients = ClientTracker(self.store)
        self.reads = Reads(self.store, self.broker)
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
        check = position_check(self.actors, self.store, self.settings.position_check_s)
        self._checker = asyncio.create_task(check, name="position-check")

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
            failed = Echo("join", actor.room_id).error(
                "internal", "room failed; join again with since_seq"
            )
            conn.send_error(failed)
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
            self.reads.history(room_id, command)  # a read: no actor needed
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
                await self.reads.finish()
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
        await self.reads.stop()
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
