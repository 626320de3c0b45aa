"""What a room actor's inbox carries: commands from routes and the hub, and
the reports of the helper tasks the actor owns.

A command is a decoded request (:mod:`..protocol`) plus who asked: ``Join``
for a ``JoinRequest``, ``Post`` for a ``PostRequest`` (the wire's ``message``
action) or a server-API post, and so on. A command names the wire action it
answers; ``echo(room_id)`` is the envelope its errors echo (PROTOCOL.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

import attrs

from ..connection import Connection
from ..errors import Echo
from ..protocol import Action
from ..store import Appended, StoredMessage
from .ordering import Entry

__all__ = ["Deliver", "Hint", "History", "Item", "Join", "Leave", "Post", "Reply"]

# What a post through the server API is answered with: the stored row, and
# whether this call stored it (False: a retry answered with the original).
Reply = asyncio.Future[tuple[StoredMessage, bool]]


class _Answers:
    """What every client command has: the wire ``action`` it answers, and the
    envelope its errors echo (the room it was sent to)."""

    __slots__ = ()
    action: ClassVar[Action]

    def echo(self, room_id: str) -> Echo:
        return Echo(self.action, room_id, getattr(self, "client_msg_id", None))


@attrs.frozen(eq=False)
class Join(_Answers):
    """A connection joins; replay ``since_seq`` or the last ``history`` messages."""

    action: ClassVar[Action] = "join"

    conn: Connection
    since_seq: int | None = None
    history: int | None = None


@attrs.frozen(eq=False)
class Leave(_Answers):
    """A connection leaves; ``quiet`` when it disconnected (no ``left`` frame).

    ``reason`` goes into the ``left`` frame when the server, not the client,
    ends the membership (``kicked``, ``forbidden``).
    """

    action: ClassVar[Action] = "leave"

    conn: Connection
    quiet: bool = False
    reason: str | None = None


@attrs.frozen(eq=False)
class Post(_Answers):
    """A post: from a joined connection (``conn``), or from the server API
    (``sender_id`` and ``reply``, answered with the row instead of frames)."""

    action: ClassVar[Action] = "message"

    conn: Connection | None
    content: str
    client_msg_id: str | None = None
    sender_id: str | None = None
    reply: Reply | None = None

    @property
    def sender(self) -> str:
        if self.conn is not None:
            return self.conn.sender_id
        assert self.sender_id is not None
        return self.sender_id


@attrs.frozen(eq=False)
class History(_Answers):
    """A connection asks for a page of history (served by the hub, not an actor)."""

    action: ClassVar[Action] = "history"

    conn: Connection
    before_seq: int | None
    limit: int


@attrs.frozen(eq=False)
class Deliver:
    """A broker payload for this room; None means payloads may have been lost."""

    payload: bytes | None


@attrs.frozen(eq=False)
class Hint:
    """The store holds the room up to ``last_seq`` (the hub's position check)."""

    last_seq: int


# ---- reports of the actor's own helper tasks ----------------------------


@attrs.frozen(eq=False)
class Synced:
    last_seq: int


@attrs.frozen(eq=False)
class SyncFailed:
    pass


@attrs.frozen(eq=False)
class View:
    """Senders present cluster-wide: read when the room starts, and again after
    the broker may have lost presence events (``refresh``: a reconnect)."""

    senders: Sequence[str]
    refresh: bool = False
    maybe: Sequence[str] = ()  # refresh: also present in one of its two reads


@attrs.frozen(eq=False)
class Read:
    """A store read for the ordering: ``rows``, everything the store holds in
    ``(after, covered]``; ``target`` the seq it was reading up to (committed);
    ``failed`` when the store did not answer."""

    rows: Sequence[StoredMessage]
    after: int
    covered: int
    target: int
    failed: bool = False


@attrs.frozen(eq=False)
class Written:
    """The writer stored a batch (``answers``, one per post) or could not (``error``)."""

    batch: Sequence[Post]
    answers: Sequence[Appended] | None
    error: str | None = None
    entries: Sequence[Entry] = ()  # the rows stored now, with their frames encoded once


@attrs.frozen(eq=False)
class ReplayDone:
    member: object  # the Member whose replay ended (identity matters)


@attrs.frozen(eq=False)
class Clamp:
    """A join's ``since_seq`` was checked against the store's newest seq (``last_seq``);
    ``floor``: the newest seq known committed when it joined."""

    member: object
    last_seq: int
    floor: int


@attrs.frozen(eq=False)
class Barrier:
    reached: asyncio.Future[None]


@attrs.frozen(eq=False)
class Stop:
    pass


Item = (
    Join
    | Leave
    | Post
    | Deliver
    | Hint
    | Synced
    | SyncFailed
    | View
    | Read
    | Written
    | ReplayDone
    | Clamp
    | Barrier
    | Stop
)
