"""What travels on a room's broker channel, encoded once by the publisher.

A payload is one or more lines, each ``KIND SP KEY [SP JSON]``:

- ``m <seq> <sent_ms> <frame>``: a stored message; ``frame`` is the ``message``
  frame exactly as subscribers receive it, so no server re-encodes it, and
  ``sent_ms`` its stored time in epoch milliseconds (for latency metrics).
- ``s <seq>``: that seq was taken but will never be stored (the write failed
  or it was a duplicate); receivers move past it without waiting.
- ``p <sender_id> <frame>``: a ``presence`` frame, delivered to everyone in
  the room but that sender.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

__all__ = ["Event", "MessageEvent", "PresenceEvent", "SkipEvent", "decode_events", "encode_events"]


@attrs.frozen
class MessageEvent:
    """A stored message with its encoded frame."""

    seq: int
    sent_ms: int
    frame: str


@attrs.frozen
class SkipEvent:
    """A seq that will never hold a message."""

    seq: int


@attrs.frozen
class PresenceEvent:
    """Someone's first connection in or last out of a room."""

    sender_id: str
    frame: str


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
            lines.append(f"p {event.sender_id} {event.frame}")
    # JSON text from orjson never holds a raw newline, so "\n" separates lines safely.
    return "\n".join(lines).encode()


def decode_events(payload: bytes) -> Iterator[Event]:
    """The events of a payload; malformed lines are skipped (a broker is not trusted input)."""
    for line in payload.decode("utf-8", "replace").split("\n"):
        kind, _, rest = line.partition(" ")
        key, _, frame = rest.partition(" ")
        try:
            if kind == "m":
                sent_ms, _, frame = frame.partition(" ")
                if frame:
                    yield MessageEvent(int(key), int(sent_ms), frame)
            elif kind == "s":
                yield SkipEvent(int(key))
            elif kind == "p" and frame:
                yield PresenceEvent(key, frame)
        except ValueError:
            continue
