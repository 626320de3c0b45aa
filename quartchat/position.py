"""The position check: what heals a room whose last message never arrived.

Every ``QUARTCHAT_POSITION_CHECK_S`` seconds the newest seq each active room
has delivered on this process is compared with the store's counter (in
batches of :data:`BATCH` rooms a query); a room that is behind is told
(``RoomActor.hint``) and reads the rest from the store. It catches a lost
last message, a subscription that went deaf and a commit whose reply was
lost, none of which a later message would reveal. The hub owns the task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from . import metrics
from .room import RoomActor
from .store import Store, StoreError

__all__ = ["BATCH", "position_check"]

log = logging.getLogger(__name__)

BATCH = 500  # rooms per counter query


async def position_check(actors: Mapping[str, RoomActor], store: Store, every_s: float) -> None:
    """Run the check every ``every_s`` seconds over ``actors`` (live: the hub's registry)."""
    while True:
        await asyncio.sleep(every_s)
        rooms = [a.room_id for a in actors.values() if a.delivered is not None]
        for start in range(0, len(rooms), BATCH):
            chunk = rooms[start : start + BATCH]
            try:
                counters = await store.last_seqs(chunk)
            except StoreError as exc:
                metrics.STORE_ERRORS.labels(op="position").inc()
                log.warning("position check failed: %s", exc)
                break
            for room_id, last in counters.items():
                actor = actors.get(room_id)
                if actor is not None:
                    actor.hint(last)
