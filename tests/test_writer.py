"""The room writer's hand-off after a batch is stored: the publish is queued before the
actor hears of the batch (so other servers get it while this one delivers), and a
broker that fails, even by raising at the call, never costs the batch its acks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from quartchat.broker.memory import MemoryBroker
from quartchat.room.commands import Post, Written
from quartchat.room.writer import Writer
from quartchat.store.database import DatabaseStore

from .conftest import wait_for


class RecordingBroker(MemoryBroker):
    """The in-process broker, noting when each publish is called and when it is sent."""

    def __init__(self, log: list[str], *, raises: bool = False) -> None:
        super().__init__()
        self.log = log
        self.raises = raises

    def publish(self, room_id: str, payload: bytes) -> Awaitable[None]:
        self.log.append("publish queued")
        if self.raises:
            raise RuntimeError("broker bug")
        return super().publish(room_id, payload)


async def _write_one(store: DatabaseStore, broker: MemoryBroker, log: list[str]) -> Written:
    reports: list[Written] = []

    def report(written: Written) -> None:
        log.append("actor told")
        reports.append(written)

    writer = Writer("r", store=store, broker=broker, batch_max=10, report=report)
    task = asyncio.create_task(writer.run())
    try:
        writer.open()
        writer.add(Post(conn=None, content="hi", sender_id="s", reply=None))
        await wait_for(lambda: bool(reports))
        await writer.wait_idle()
        assert not task.done()  # the writer lives on for later posts
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return reports[0]


async def test_the_publish_is_queued_before_the_actor_hears_of_the_batch(
    store: DatabaseStore,
) -> None:
    log: list[str] = []
    written = await _write_one(store, RecordingBroker(log), log)
    assert log == ["publish queued", "actor told"]
    assert written.answers is not None and [a.row.seq for a in written.answers] == [1]


async def test_a_publish_that_raises_at_the_call_still_acks_the_batch(
    store: DatabaseStore, caplog: Any
) -> None:
    log: list[str] = []
    written = await _write_one(store, RecordingBroker(log, raises=True), log)
    assert log == ["publish queued", "actor told"]
    assert written.error is None and written.answers is not None
    assert "publish raised" in caplog.text
