"""quartchat.flag.Flag behaves like asyncio.Event for what the sockets use of it."""

from __future__ import annotations

import asyncio

from quartchat.flag import Flag


async def test_set_wakes_every_waiter_and_wait_on_a_set_flag_returns_at_once() -> None:
    flag = Flag()
    woken: list[int] = []

    async def waiter(i: int) -> None:
        await flag.wait()
        woken.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert woken == [] and not flag.is_set()
    flag.set()
    await asyncio.wait(tasks, timeout=1)
    assert sorted(woken) == [0, 1, 2]
    async with asyncio.timeout(1):
        await flag.wait()  # set: no wait
    flag.clear()
    assert not flag.is_set()


async def test_a_cancelled_waiter_is_forgotten_and_others_still_wake() -> None:
    flag = Flag()
    gone = asyncio.create_task(flag.wait())
    stays = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.wait([gone])
    assert flag._waiters is not None and len(flag._waiters) == 1
    flag.set()
    async with asyncio.timeout(1):
        await stays
    assert gone.cancelled() and flag._waiters is None


def test_a_flag_allocates_no_waiter_list_until_waited_on() -> None:
    assert Flag()._waiters is None and Flag(True).is_set()
