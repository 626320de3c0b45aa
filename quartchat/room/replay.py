"""One member's replay: what it missed, from the store, at the pace its socket takes.

A replay runs as a task the actor owns, one per member at most. It sends the
stored rows between the member's cursor and the room's delivered seq (read
again on every page, since the room moves on meanwhile), waiting for room in
the socket's queue before each page. It ends when it has caught up; the
actor then switches the member to live, or starts another round if more
arrived in between. A leave cancels it (no frame of it can follow ``left``).
A store that fails is retried with backoff while the member stays joined:
the member sees a delay, never a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .. import metrics
from ..errors import CloseCode
from ..store import Store, StoreError
from .frames import encode_row
from .members import Member

__all__ = ["replay"]

log = logging.getLogger(__name__)

_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0
# A replaying client that takes no frame for this long is not slow but gone or
# stuck: it is closed with 4008 like a live one whose queue overflowed.
STALL_S = 30.0


async def _room_for_a_page(member: Member) -> bool:
    conn = member.conn
    try:
        async with asyncio.timeout(STALL_S):
            return await conn.wait_for_space()
    except TimeoutError:
        metrics.SLOW_CONSUMER_CLOSES.inc()
        conn.close(CloseCode.SLOW_CONSUMER, "slow consumer: replay stalled")
        return False


async def replay(
    store: Store,
    room_id: str,
    member: Member,
    delivered: Callable[[], int],
    *,
    page: int,
    newest: int | None = None,
) -> None:
    """Send ``member`` the rows above its cursor up to ``delivered()``.

    ``newest``: first the last ``newest`` rows at or below the cursor (a join
    with ``history``: the cursor is the room's seq at the join), then as above.
    """
    conn = member.conn
    page = max(1, min(page, conn.queue_size // 2))
    backoff = _RETRY_MIN_S
    while True:
        try:
            if newest is not None:
                # The last `newest` as of the join (the member's cursor then), however
                # far the room has moved since: the catch-up below sends the rest.
                upto = member.cursor
                rows, _ = await store.page(room_id, upto + 1, min(newest, page))
                if not await _room_for_a_page(member):
                    return
                for row in rows:
                    conn.send(encode_row(row))
                metrics.REPLAYED_MESSAGES.inc(len(rows))
                newest = None
            while member.cursor < delivered() and conn.open:
                upto = delivered()
                rows = await store.after(room_id, member.cursor, upto, page)
                if not await _room_for_a_page(member):
                    return  # the socket is closing
                for row in rows:
                    conn.send(encode_row(row))
                metrics.REPLAYED_MESSAGES.inc(len(rows))
                # An empty or short page means the store holds nothing more up to
                # `upto` (a page ends at `upto` at the latest).
                member.cursor = rows[-1].seq if len(rows) == page else upto
            return
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="replay").inc()
            log.warning(
                "replay failed, retrying in %.1f s: %s", backoff, exc, extra={"room_id": room_id}
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX_S)
