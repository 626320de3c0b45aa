"""What travels on a room's broker channel: domain events, encoded once by the publisher.

A payload is one or more lines, each ``KIND SP KEY [SP REST]``:

- ``m <seq> <sent_ms> <frame>``: a stored message; ``frame`` is the ``message``
  frame exactly as subscribers receive it, so no server re-encodes it, and
  ``sent_ms`` its stored time in epoch milliseconds (for latency metrics).
- ``s <seq>``: that seq was taken but will never be stored (the write failed
  or it was a duplicate); receivers move past it without waiting.
- ``p <sender_id> <join|leave>``: that sender's first connection anywhere
  entered the room, or its last one anywhere left it.

The broker carries these events and builds no client frame: the room turns a
presence event into its ``presence`` frame (room/frames.py). A message event
is the one exception that carries a client frame, and on purpose: the room's
writer (room/writer.py) builds it once, from the stored row, with the same
function as history pages (``frames.encode_row``, i.e.
``protocol.message_frame``), and every member on every server sends that text
as it is: encoding each message once per cluster instead of once per server
is the hot path's saving. The broker never looks inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import attrs

__all__ = [
    "Event",
    "MessageEvent",
    "PresenceEvent",
    "PresenceKind",
    "SkipEvent",
    "decode_events",
    "encode_events",
]

PresenceKind = Literal["join", "leave"]


@attrs.frozen
class MessageEvent:
    """A stored message with its encoded ``message`` frame (built by the room's writer)."""

    seq: int
    sent_ms: int
    frame: str


@attrs.frozen
class SkipEvent:
    """A seq that will never hold a message."""

    seq: int


@attrs.frozen
class PresenceEvent:
    """Someone's first connection in (``join``) or last out (``leave``) of a room, anywhere."""

    sender_id: str
    event: PresenceKind


Event = MessageEvent | SkipEvent | PresenceEvent


def encode_events(events: Iterable[Event]) -> bytes:
    """One payload for a batch of events, in order."""
    lines = []
    for event in events:
        if isinstance(event, MessageEvent):
            lines.append(f"m {event.seq} {event.sent_ms} {event.frame}")
        elif isinstance(event, SkipEvent):
            lines.append(f"s {event.seq}")
        else:
            lines.append(f"p {event.sender_id} {event.event}")
    # JSON text from orjson never holds a raw newline, and sender ids hold neither
    # a space nor a newline, so "\n" separates lines and " " fields safely.
    return "\n".join(lines).encode()


def decode_events(payload: bytes) -> Iterator[Event]:
    """The events of a payload; malformed lines are skipped (a broker is not trusted input)."""
    for line in payload.decode("utf-8", "replace").split("\n"):
        kind, _, rest = line.partition(" ")
        key, _, tail = rest.partition(" ")
        try:
            if kind == "m":
                sent_ms, _, frame = tail.partition(" ")
                if frame:
                    yield MessageEvent(int(key), int(sent_ms), frame)
            elif kind == "s":
                yield SkipEvent(int(key))
            elif kind == "p" and key:
                if tail == "join":
                    yield PresenceEvent(key, "join")
                elif tail == "leave":
                    yield PresenceEvent(key, "leave")
        except ValueError:
            continue
