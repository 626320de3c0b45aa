"""A room's writer: takes accepted posts in batches, stores them (the store
gives them their seqs), then queues each batch's publish and reports it to the actor.

One task per active room, owned by the actor. Batches are written one after
another, so the room's publishes leave this process in seq order. The actor
hears of a batch (to deliver it locally and ack it) as soon as it is stored,
in the same step that queues its publish (queued first, so the broker sends
it while the actor delivers here): nothing is acked or delivered that is not
stored. A publish that fails loses nothing: other servers find
the rows in the store with their position check.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable

from .. import metrics
from ..broker import BrokerError, PubSub
from ..events import MessageEvent, encode_events
from ..store import NewMessage, Store, StoreError
from .commands import Post, Written
from .frames import encode_row
from .ordering import Entry

__all__ = ["Writer"]

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Writer:
    """Pending posts of one room and the task that writes them."""

    def __init__(
        self,
        room_id: str,
        *,
        store: Store,
        broker: PubSub,
        batch_max: int,
        report: Callable[[Written], None],
    ) -> None:
        self.room_id = room_id
        self._store = store
        self._broker = broker
        self._batch_max = batch_max
        self._report = report
        self._pending: deque[Post] = deque()
        self._wake = asyncio.Event()
        self._writing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # set once the room knows where live delivery starts

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._writing

    def add(self, cmd: Post) -> None:
        self._pending.append(cmd)
        self._idle.clear()
        self._wake.set()

    def take_pending(self) -> list[Post]:
        """Remove and return the posts not yet being written."""
        taken = list(self._pending)
        self._pending.clear()
        if not self._writing:
            self._idle.set()
        return taken

    def open(self) -> None:
        """Start writing (posts queue until then)."""
        self._open.set()

    async def wait_idle(self) -> None:
        """Return once every post added so far has been written (or refused) and reported."""
        await self._idle.wait()

    async def run(self) -> None:
        """The writer loop; cancelled by the actor once it is idle (or at shutdown)."""
        await self._open.wait()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                count = min(len(self._pending), self._batch_max)
                batch = [self._pending.popleft() for _ in range(count)]
                self._writing = True
                try:
                    await self._write(batch)
                finally:
                    self._writing = False
            self._idle.set()

    async def _write(self, batch: list[Post]) -> None:
        stamp = now_ms()
        posts = [
            NewMessage(uuid.uuid4().hex, cmd.sender, cmd.content, cmd.client_msg_id, stamp)
            for cmd in batch
        ]
        started = time.perf_counter()
        try:
            answers = await self._store.append(self.room_id, posts)
        except StoreError as exc:
            metrics.STORE_ERRORS.labels(op="insert").inc()
            log.warning(
                "cannot store %d messages: %s", len(batch), exc, extra={"room_id": self.room_id}
            )
            # The insert may have committed although its reply was lost: then the
            # rows are in the store with their seqs, and every server delivers
            # them through its position check. A retry with the same
            # client_msg_id is answered with the original.
            self._report(
                Written(batch, None, "storage unavailable; retry later with the same client_msg_id")
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("room write failed", extra={"room_id": self.room_id})
            self._report(Written(batch, None, "internal"))
            return
        created = [a.row for a in answers if a.created]
        if created:
            metrics.STORE_WRITE_LATENCY.observe(time.perf_counter() - started)
            metrics.STORE_BATCH_SIZE.observe(len(created))
            metrics.MESSAGES_STORED.inc(len(created))
        entries = [Entry(r.seq, r.sent_at_ms, encode_row(r)) for r in created]
        if not entries:
            self._report(Written(batch, answers, entries=entries))
            return
        payload = encode_events([MessageEvent(e.seq, e.sent_ms, e.frame) for e in entries])
        # Queue the publish first, then tell the actor: the publisher task is
        # woken before the actor, so the payload leaves for the other servers
        # while the actor acks and delivers here (and a broker that delivers
        # in-process hands the actor its copy before the report: the ordering
        # takes whichever comes first, once).
        sent: Awaitable[None] | Exception
        try:
            sent = self._broker.publish(self.room_id, payload)
        except Exception as exc:  # noqa: BLE001 - handled below as a failed send; the batch is acked
            sent = exc
        self._report(Written(batch, answers, entries=entries))
        try:
            if isinstance(sent, Exception):
                raise sent
            await sent
            metrics.MESSAGES_PUBLISHED.inc(len(created))
        except BrokerError as exc:
            log.warning(
                "publish failed (other servers catch up from the store): %s",
                exc,
                extra={"room_id": self.room_id},
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in a broker must not end the room's writer (later posts would
            # never be acked): the rows are stored, other servers catch up.
            log.exception(
                "publish raised (other servers catch up from the store)",
                extra={"room_id": self.room_id},
            )
