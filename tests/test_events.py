"""The broker channel's encoding (events.py): every event survives a round trip, and a
payload's malformed lines are skipped without losing the good ones around them."""

from __future__ import annotations

from quartchat.events import (
    Event,
    MessageEvent,
    PresenceEvent,
    SkipEvent,
    decode_events,
    encode_events,
)

FRAME = '{"type":"message","room_id":"r","seq":7,"content":"a b\\nc"}'


def test_every_event_survives_a_round_trip_in_order() -> None:
    events: list[Event] = [
        MessageEvent(7, 1_700_000_000_123, FRAME),
        SkipEvent(8),
        PresenceEvent("alice@example.com", "join"),
        PresenceEvent("bob", "leave"),
        MessageEvent(9, 0, "{}"),
    ]
    payload = encode_events(events)
    assert list(decode_events(payload)) == events
    assert list(decode_events(encode_events([]))) == []


def test_a_presence_event_carries_no_client_frame() -> None:
    assert encode_events([PresenceEvent("alice", "join")]) == b"p alice join"
    assert encode_events([PresenceEvent("alice", "leave")]) == b"p alice leave"


def test_malformed_lines_are_skipped() -> None:
    good = [MessageEvent(1, 2, FRAME), PresenceEvent("carol", "leave"), SkipEvent(3)]
    bad = [
        "",
        "x 1",
        "m",
        "m 1",
        "m 1 2",
        "m one 2 {}",
        "m 1 two {}",
        "s",
        "s three",
        "p",
        "p alice",
        "p alice joined",
        "p alice join extra",
        "p  join",
        'p alice {"type":"presence","room_id":"r","event":"join","sender_id":"alice"}',
        "\xff\xfe",
    ]
    lines = [bad[0], encode_events(good[:1]).decode(), *bad[1:8]]
    lines += [encode_events(good[1:2]).decode(), *bad[8:], encode_events(good[2:]).decode()]
    payload = "\n".join(lines).encode()
    assert list(decode_events(payload)) == good
    assert list(decode_events(b"\xff\xfe garbage")) == []
