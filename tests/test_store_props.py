"""Property: whatever mix of appends two servers make at once (new posts, retries of
stored ones, a retry inside its own batch, big and small batches, several rooms, two
transactions in flight per MySQL store), every room's seqs run 1..n with no hole, each
retry key is stored once and every answer to it is that row, and each answer is exactly
the row stored with its seq. On MariaDB and on SQLite.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quartchat.store import Appended, NewMessage
from quartchat.store.database import DatabaseStore

ROOMS = ["a", "b", "c"]
SENDERS = ["s1", "s2"]
KEYS = [None, None, "k0", "k1", "k2", "k3"]  # half the posts can be retried

post = st.tuples(st.sampled_from(SENDERS), st.sampled_from(KEYS))
small = st.lists(post, min_size=1, max_size=4)
big = st.lists(post, min_size=20, max_size=120)
call = st.tuples(
    st.integers(0, 1),  # which server
    st.sampled_from(ROOMS),
    st.one_of(small, small, small, big),
    st.integers(0, 3),  # loop turns to wait before calling: the interleaving
)


async def _run(url: str, calls: list[tuple[int, str, list[tuple[str, str | None]], int]]) -> None:
    run = uuid.uuid4().hex[:8]  # rooms of this example only: examples share a database
    stores = [DatabaseStore(url, op_timeout=10) for _ in range(2)]
    for s in stores:
        await s.connect()
    try:
        made: list[tuple[str, list[NewMessage]]] = []

        async def one(server: int, room: str, posts: list[NewMessage], turns: int) -> list[Any]:
            for _ in range(turns):
                await asyncio.sleep(0)
            return await stores[server].append(room, posts)

        tasks = []
        for n, (server, room, posts, turns) in enumerate(calls):
            news = [
                NewMessage(uuid.uuid4().hex, sender, f"{run} {n}.{i}", key, 1_795_000_000_000 + n)
                for i, (sender, key) in enumerate(posts)
            ]
            made.append((f"{run}-{room}", news))
            tasks.append(one(server, f"{run}-{room}", news, turns))
        async with asyncio.timeout(60):
            results: list[list[Appended]] = await asyncio.gather(*tasks)

        for room in {r for r, _ in made}:
            rows = await stores[0].after(room, 0, None, 10_000)
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), "no hole, no repeat"
            by_seq = {r.seq: r for r in rows}
            keys = [(r.sender_id, r.client_msg_id) for r in rows if r.client_msg_id is not None]
            assert len(keys) == len(set(keys)), "each retry key stored once"
            by_key = {(r.sender_id, r.client_msg_id): r for r in rows if r.client_msg_id}
            created = 0
            for (r, news), answers in zip(made, results):
                if r != room:
                    continue
                assert len(answers) == len(news)
                for p, a in zip(news, answers):
                    assert by_seq[a.row.seq] == a.row, "the answer is the stored row"
                    if a.created:
                        created += 1
                        assert a.row.id == p.id and a.row.content == p.content
                    else:
                        assert p.client_msg_id is not None, "only a retry is not created"
                    if p.client_msg_id is not None:
                        assert by_key[(p.sender_id, p.client_msg_id)] == a.row
                fresh = [a.row.seq for a in answers if a.created]
                assert fresh == sorted(fresh), "a call's new rows in its own order"
            assert created == len(rows), "every stored row was answered as created once"
    finally:
        for s in stores:
            await s.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=st.lists(call, min_size=1, max_size=10))
def test_any_interleaving_of_appends_keeps_seqs_and_retries_exact(
    backend_url: str, calls: list[tuple[int, str, list[tuple[str, str | None]], int]]
) -> None:
    asyncio.run(_run(backend_url, calls))
