"""One append transaction of the store: what goes on between BEGIN and COMMIT
when posts of one or more rooms are stored with their seqs (see
:mod:`quartchat.store` for why the database assigns them)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs

from . import Appended, NewMessage, StoredMessage
from .dialect import Dialect, to_ms

__all__ = ["Request", "append_in", "reply", "row_of"]


@attrs.define(eq=False)
class Request:
    """One room's batch waiting for the group writer."""

    room_id: str
    posts: Sequence[NewMessage]
    waiter: asyncio.Future[list[Appended]]


def row_of(record: Sequence[Any]) -> StoredMessage:
    room_id, seq, id_, sender_id, content, client_msg_id, created_at = record
    return StoredMessage(
        room_id=room_id,
        seq=int(seq),
        id=id_,
        sender_id=sender_id,
        content=content,
        client_msg_id=client_msg_id,
        sent_at_ms=to_ms(created_at),
    )


async def append_in(
    d: Dialect, raw: Any, rooms: Sequence[str], group: Sequence[Request]
) -> tuple[list[list[Appended]], list[str]]:
    """The body of one append transaction on ``raw`` (already begun): lock the rooms'
        counters in key order, answer retries, insert the new rows, move the counters.
        Returns the answers per request, and the rooms that have no counter row (then
    nothing was written and the caller must fail the transaction)."""
    counters = {
        room: int(last) for room, last in await d.fetch(raw, d.lock_counters(len(rooms)), rooms)
    }
    missing = [room for room in rooms if room not in counters]
    if missing:
        return [], missing
    # Retries: already stored copies, read under the rooms' locks, so no
    # other writer can store the same key in between.
    wanted: dict[tuple[str, str], set[str]] = {}
    for request in group:
        for post in request.posts:
            if post.client_msg_id is not None:
                wanted.setdefault((request.room_id, post.sender_id), set()).add(post.client_msg_id)
    found: dict[tuple[str, str, str], StoredMessage] = {}
    if wanted:
        groups = [(room, sender, len(ids)) for (room, sender), ids in wanted.items()]
        params: list[Any] = []
        for (room, sender), ids in wanted.items():
            params += [room, sender, *sorted(ids)]
        for record in await d.fetch(raw, d.find_retries(groups), params):
            row = row_of(record)
            assert row.client_msg_id is not None
            found[(row.room_id, row.sender_id, row.client_msg_id)] = row
    answers: list[list[Appended]] = []
    inserts: list[tuple[Any, ...]] = []
    moved: dict[str, int] = {}
    for request in group:
        room = request.room_id
        answer: list[Appended] = []
        for post in request.posts:
            key = None if post.client_msg_id is None else (room, post.sender_id, post.client_msg_id)
            if key is not None and key in found:
                answer.append(Appended(found[key], created=False))
                continue
            counters[room] += 1
            row = StoredMessage(
                room_id=room,
                seq=counters[room],
                id=post.id,
                sender_id=post.sender_id,
                content=post.content,
                client_msg_id=post.client_msg_id,
                sent_at_ms=post.sent_at_ms,
            )
            if key is not None:
                found[key] = row  # a second copy later in the group is its retry
            moved[room] = counters[room]
            inserts.append(
                (
                    room,
                    row.seq,
                    row.id,
                    row.sender_id,
                    row.content,
                    row.client_msg_id,
                    d.timestamp(row.sent_at_ms),
                )
            )
            answer.append(Appended(row, created=True))
        answers.append(answer)
    if inserts:
        await d.execute_many(raw, d.insert_messages, inserts)
        await d.execute_many(
            raw, d.update_counter, [(last, room) for room, last in sorted(moved.items())]
        )
    return answers, []


def reply(
    request: Request, answer: list[Appended] | None = None, *, exc: BaseException | None = None
) -> None:
    if request.waiter.done():
        return  # the caller gave up (cancelled)
    if exc is not None:
        request.waiter.set_exception(exc)
    else:
        assert answer is not None
        request.waiter.set_result(answer)
