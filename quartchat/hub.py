"""The hub: this process's registry of room actors and open connections.

It owns the store and the broker, starts a room's actor on first use, lets an
idle actor retire, and runs the graceful drain. Routes talk only to the hub.
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
from .errors import CLOSE_GOING_AWAY, ChatError
from .room import History, Join, Leave, Publish, RoomActor, RoomConfig, page_json
from .store import Store, StoreError, create_store

__all__ = ["Hub", "ClientTracker"]

log = logging.getLogger(__name__)

_CLIENTS_FLUSH_S = 1.0
_CLIENTS_MAX_PENDING = 100_000


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
        self.store = store if store is not None else create_store(
            settings.database_url, op_timeout=settings.db_timeout_s
        )
        self.broker = broker if broker is not None else create_broker(settings)
        self.room_config = RoomConfig(
            batch_max=settings.batch_max,
            inbox_max=settings.room_inbox,
            replay_max=settings.replay_max,
            idle_s=settings.room_idle_s,
            gap_timeout_s=settings.gap_timeout_s,
            skip_timeout_s=settings.skip_timeout_s,
            inflight_s=settings.db_timeout_s + 1.0,
        )
        self.actors: dict[str, RoomActor] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.connections: set[Connection] = set()
        self.clients = ClientTracker(self.store)
        self.draining = False
        self.started = False

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
        self.started = True

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
        return actor

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

    def submit(self, room_id: str, command: Join | Leave | Publish | History) -> None:
        """Hand a command to the room; raises ChatError when the room refuses it."""
        if self.draining and isinstance(command, Publish | Join | History):
            raise ChatError("unavailable", "server is shutting down; reconnect elsewhere")
        self.actor(room_id).offer(command)

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
        metrics.CONNECTIONS_CLOSED.labels(code=str(conn.close_code or 1000)).inc()
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
                # Posts already accepted are written, acked and delivered first.
                actors = list(self.actors.values())
                await asyncio.gather(*(a.wait_idle() for a in actors))
                await asyncio.gather(*(a.settle() for a in actors))
        except TimeoutError:
            log.warning("drain: pending writes did not finish in %.1fs", timeout)
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "server going away")
        try:
            async with asyncio.timeout(max(0.5, timeout - (time.monotonic() - started))):
                await asyncio.gather(*(c.wait_closed() for c in list(self.connections)))
        except TimeoutError:
            log.warning("drain: some sockets did not flush in time")
        metrics.DRAIN_SECONDS.observe(time.monotonic() - started)

    async def stop(self) -> None:
        """Stop every actor (writing what is pending), then the broker and the store."""
        self.draining = True
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
        self.started = False
