"""leansocket's replacements behave as what they replace: AppQueue as asyncio.Queue,
LeanEvent as asyncio.Event, over random interleavings of puts, gets, waits and
cancellations (the same schedule run against both must give the same trace)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from quartchat.leansocket import AppQueue, LeanEvent, SmallFifo

# One step of a schedule: start a put of the next item, start a get, cancel the
# n-th most recently started task (if still running), or let the loop run a turn.
_STEP = st.one_of(
    st.just(("put",)),
    st.just(("get",)),
    st.tuples(st.just("cancel"), st.integers(0, 4)),
    st.just(("turn",)),
)


async def _run_queue(queue: Any, steps: list[tuple[Any, ...]]) -> list[Any]:
    """Run the schedule; the trace is every task's outcome, in start order, plus what
    each get returned, in the order the gets finished."""
    tasks: list[asyncio.Task[Any]] = []
    finished: list[tuple[str, Any]] = []
    item = 0

    async def put(value: int) -> None:
        await queue.put(value)
        finished.append(("put", value))

    async def get() -> None:
        finished.append(("got", await queue.get()))

    for step in steps:
        if step[0] == "put":
            tasks.append(asyncio.ensure_future(put(item)))
            item += 1
        elif step[0] == "get":
            tasks.append(asyncio.ensure_future(get()))
        elif step[0] == "cancel" and tasks:
            tasks[-1 - step[1] % len(tasks)].cancel()
        await asyncio.sleep(0)  # every step gives the started tasks a turn
    for _ in range(3):
        await asyncio.sleep(0)
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = ["cancelled" if t.cancelled() else "done" for t in tasks]
    return [outcomes, finished, queue.qsize()]


@settings(max_examples=500, deadline=None)
@given(maxsize=st.integers(0, 3), steps=st.lists(_STEP, max_size=40))
# a getter, then a putter, cancelled after its wake-up: the wake-up passes to the next
@example(maxsize=0, steps=[("get",), ("get",), ("put",), ("cancel", 2)])
@example(maxsize=1, steps=[("put",), ("put",), ("put",), ("get",), ("cancel", 2)])
def test_app_queue_traces_like_asyncio_queue(maxsize: int, steps: list[tuple[Any, ...]]) -> None:
    """FIFO, no item lost or doubled, put waits while full, waiters served in order,
    and a waiter cancelled after its wake-up passes it on: all as asyncio.Queue."""
    ours = asyncio.run(_run_queue(AppQueue(maxsize), steps))
    theirs = asyncio.run(_run_queue(asyncio.Queue(maxsize), steps))
    assert ours == theirs


_EVENT_STEP = st.sampled_from(["set", "clear", "wait", "cancel-first", "turn"])


async def _run_event(event: Any, steps: list[str], lean: bool) -> list[Any]:
    tasks: list[asyncio.Task[Any]] = []
    woke: list[int] = []

    async def wait(n: int) -> None:
        await event.wait()
        woke.append(n)

    for step in steps:
        if step == "set":
            await event.set() if lean else event.set()
        elif step == "clear":
            await event.clear() if lean else event.clear()
        elif step == "wait":
            tasks.append(asyncio.ensure_future(wait(len(tasks))))
        elif step == "cancel-first":
            running = [t for t in tasks if not t.done()]
            if running:
                running[0].cancel()
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    states = ["cancelled" if t.cancelled() else "done" if t.done() else "waiting" for t in tasks]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [states, woke, event.is_set()]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_EVENT_STEP, max_size=30))
def test_lean_event_traces_like_asyncio_event(steps: list[str]) -> None:
    ours = asyncio.run(_run_event(LeanEvent(), steps, lean=True))
    theirs = asyncio.run(_run_event(asyncio.Event(), steps, lean=False))
    assert ours == theirs


def test_small_fifo_pops_from_the_left() -> None:
    fifo: SmallFifo[int] = SmallFifo()
    fifo.append(1)
    fifo.append(2)
    assert fifo.popleft() == 1
    assert fifo and fifo.popleft() == 2
    assert not fifo


async def test_the_app_shares_one_null_session(tmp_path: Any) -> None:
    """quartchat sets no secret key: every socket gets the one NullSession (not one
    each), and it still refuses writes."""
    import pytest
    from quart.sessions import NullSession

    from quartchat.app import create_app
    from quartchat.config import Settings

    settings = Settings.from_env(
        {"QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/s.db"}, env_file=None
    )
    app = create_app(settings, migrate_on_start=False)
    first = await app.session_interface.make_null_session(app)
    assert isinstance(first, NullSession)
    assert await app.session_interface.make_null_session(app) is first
    with pytest.raises(RuntimeError):
        first["k"] = "v"
