"""A room's members on this process, and who is present cluster-wide.

Each local connection in the room is a :class:`Member` with a cursor: the
last seq it was sent. Live messages go to a member only above its cursor, so
a join with ``since_seq`` ahead of this process's delivery gets no duplicate,
and a member whose replay is still running (``live`` False) gets nothing live:
its replay catches up from the store instead (flow-controlled, never 4008 for
being far behind).

Presence never sits on the delivery path: the broker is told of this
process's first connection of a sender in and last one out, and applies that
in the background. ``joined.members`` comes from a view kept here: one read
when the room starts, then the presence events on the room's channel, plus
the local senders.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Iterator

import attrs

from ..connection import Connection

__all__ = ["Member", "Members"]


@attrs.define(eq=False)
class Member:
    """One local connection in the room."""

    conn: Connection
    cursor: int  # the newest seq this member has been sent (or does not need)
    live: bool = True  # False while its replay runs
    replay: asyncio.Task[None] | None = None


class Members:
    """The local members (by connection), local sender counts and the cluster-wide view."""

    def __init__(self) -> None:
        self._by_conn: dict[Connection, Member] = {}
        self._local: Counter[str] = Counter()
        self._remote: set[str] = set()

    def __len__(self) -> int:
        return len(self._by_conn)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._by_conn.values())

    def get(self, conn: Connection) -> Member | None:
        return self._by_conn.get(conn)

    def add(self, member: Member) -> bool:
        """Add a member; True if it is this process's first connection of its sender."""
        self._by_conn[member.conn] = member
        sender = member.conn.sender_id
        self._local[sender] += 1
        return self._local[sender] == 1

    def remove(self, conn: Connection) -> tuple[Member | None, bool]:
        """Remove a member; the second value is True if it was its sender's last here."""
        member = self._by_conn.pop(conn, None)
        if member is None:
            return None, False
        sender = conn.sender_id
        self._local[sender] -= 1
        if self._local[sender] > 0:
            return member, False
        del self._local[sender]
        return member, True

    def local_senders(self) -> list[str]:
        return list(self._local)

    def seen(self, senders: Iterable[str]) -> None:
        """The cluster-wide read made when the room started."""
        self._remote.update(senders)

    def refresh(self, present: Iterable[str], maybe: Iterable[str]) -> tuple[list[str], list[str]]:
        """Two cluster-wide reads made after presence events may have been lost:
        ``present`` in both, ``maybe`` in either. A sender in neither is gone, one in
        both is present, the rest stay as they were. -> (senders now present, senders
        now gone), as the room's members see them (local senders always are)."""
        before = set(self.view())
        self._remote = (self._remote & set(maybe)) | set(present)
        after = set(self.view())
        return sorted(after - before), sorted(before - after)

    def presence(self, sender: str, event: str) -> None:
        """A presence event from the room's channel (first in / last out anywhere)."""
        if event == "join":
            self._remote.add(sender)
        elif event == "leave":
            self._remote.discard(sender)

    def view(self) -> list[str]:
        """Each present sender once, sorted: this process's and the cluster's."""
        return sorted(self._remote.union(self._local))
