"""A room: one actor per active room on each process, and its parts.

- :mod:`.commands`: what the actor's inbox carries;
- :mod:`.ordering`: delivery by seq, holes read from the store (no I/O);
- :mod:`.members`: local members with their cursors, the presence view;
- :mod:`.writer`: batching, store (which assigns seqs), report, publish;
- :mod:`.replay`: one flow-controlled, cancellable replay per member;
- :mod:`.frames`: the frames a room sends;
- :mod:`.actor`: the loop that ties them together.
"""

from __future__ import annotations

from .actor import RoomActor, RoomConfig
from .commands import Deliver, History, Join, Leave, Post, Reply
from .frames import page_json

__all__ = [
    "Deliver",
    "History",
    "Join",
    "Leave",
    "Post",
    "Reply",
    "RoomActor",
    "RoomConfig",
    "page_json",
]
