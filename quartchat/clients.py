"""The ``clients`` table: when each sender was first and last seen.

:class:`ClientTracker` records sightings in memory (a connect, a disconnect)
and writes them in one batch a second, off the socket path, from one task
the hub starts and stops. The pending table is bounded; a failed write keeps
the newest sightings for the next one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from . import metrics
from .store import Store, StoreError

__all__ = ["ClientTracker"]

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
