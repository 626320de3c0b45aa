"""One append transaction of the store: what goes on between BEGIN and COMMIT
when posts of one or more rooms are stored with their seqs (see
:mod:`quartchat.store` for why the database assigns them)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs

from . import Appended, NewMessage, StoredMessage
from .dialect import Dialect, Query, to_ms

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
    """One append transaction on ``raw``: begin, lock the rooms' counters in key
    order, answer retries, insert the new rows, move the counters, commit (how
    these reach the server is the dialect's: :meth:`.Dialect.begin_append`,
    :meth:`.Dialect.commit_append`). Returns the answers per request, and the
    rooms that have no counter row (then nothing was written, the transaction
    is ended, and the caller must fail the append)."""
    # Retries: already stored copies, read under the rooms' locks (the dialect
    # runs the lookup after the counters' FOR UPDATE), so no other writer can
    # store the same key in between.
    wanted: dict[tuple[str, str], set[str]] = {}
    for request in group:
        for post in request.posts:
            if post.client_msg_id is not None:
                wanted.setdefault((request.room_id, post.sender_id), set()).add(post.client_msg_id)
    # The lookup sent with the locks is a probe for seqs only: nearly every post
    # with a client_msg_id is new, and the driver parses each column's description
    # of a result even when it has no row. Only when the probe finds a copy are
    # the full rows read, in the same transaction, still under the locks.
    groups = [(room, sender, len(ids)) for (room, sender), ids in wanted.items()]
    params: list[Any] = []
    for (room, sender), ids in wanted.items():
        params += [room, sender, *sorted(ids)]
    probe: Query | None = (d.find_retries(groups, probe=True), params) if wanted else None
    counter_rows, probed = await d.begin_append(raw, rooms, probe)
    counters = {room: int(last) for room, last in counter_rows}
    missing = [room for room in rooms if room not in counters]
    if missing:
        await d.commit_append(raw, [], [])  # ends the transaction, which wrote nothing
        return [], missing
    retry_rows = await d.fetch(raw, d.find_retries(groups), params) if probed else []
    found: dict[tuple[str, str, str], StoredMessage] = {}
    for record in retry_rows:
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
    await d.commit_append(raw, inserts, [(last, room) for room, last in sorted(moved.items())])
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
