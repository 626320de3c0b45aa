"""Reads that need no room actor: what the HTTP read routes and a socket's
``history`` ask of the store and the broker.

:class:`Reads` answers ``/api/rooms``, a room's members and messages pages
and ``/readyz`` (routes reach it as ``hub.reads``), and serves the socket's
``history`` requests (handed over by :meth:`Hub.submit`) from tasks it owns,
at most :data:`HISTORY_READS` at once. A store or broker failure is an
``unavailable`` error, never an exception of the store's or the broker's.
"""

from __future__ import annotations

import asyncio
import logging

from . import metrics
from .broker import Broker, BrokerError
from .errors import ChatError
from .room import History, page_json
from .store import Store, StoreError

__all__ = ["HISTORY_READS", "Reads"]

log = logging.getLogger(__name__)

HISTORY_READS = 64  # history pages read at once by this process (more wait)


class Reads:
    """Presence, history pages and readiness, read from the store and the broker."""

    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self._tasks: set[asyncio.Task[None]] = set()  # socket history reads
        self._slots = asyncio.Semaphore(HISTORY_READS)

    # ---- the socket's history ---------------------------------------------

    def history(self, room_id: str, cmd: History) -> None:
        """Answer a socket's ``history`` with a page (or ``unavailable``), from a task."""

        async def read() -> None:
            async with self._slots:
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

    async def finish(self) -> None:
        """Return once the history reads started so far have answered (a drain)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Cancel the history reads still out."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- HTTP -----------------------------------------------------------------

    async def rooms(self) -> list[tuple[str, int]]:
        """Rooms with members, cluster-wide, and their member counts."""
        try:
            return await self.broker.presence.rooms()
        except BrokerError as exc:
            raise ChatError("unavailable", f"presence unavailable: {exc}") from exc

    async def members(self, room_id: str) -> list[str]:
        """A room's members, cluster-wide."""
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

    async def ready(self, *, draining: bool) -> dict[str, str]:
        """Check the store and the broker; the dict names what failed (and a drain)."""
        problems: dict[str, str] = {}
        if draining:
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
