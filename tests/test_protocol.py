"""Frame decoding: every bad input gets the error code PROTOCOL.md names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quartchat.errors import ChatError
from quartchat.protocol import (
    HistoryRequest,
    JoinRequest,
    LeaveRequest,
    Limits,
    PingRequest,
    PostRequest,
    format_sent_at,
    parse_frame,
)

LIMITS = Limits(max_content=16, history_max=100)


def error_of(frame: str | bytes) -> ChatError:
    with pytest.raises(ChatError) as info:
        parse_frame(frame, LIMITS)
    return info.value


def test_valid_frames() -> None:
    assert parse_frame('{"action":"ping"}', LIMITS) == PingRequest()
    assert parse_frame('{"action":"join","room_id":"a.b:c-d_1"}', LIMITS) == JoinRequest(
        "a.b:c-d_1"
    )
    assert parse_frame(
        '{"action":"join","room_id":"r","since_seq":0,"history":100}', LIMITS
    ) == JoinRequest("r", 0, 100)
    assert parse_frame('{"action":"leave","room_id":"r","extra":1}', LIMITS) == LeaveRequest("r")
    assert parse_frame(
        '{"action":"message","room_id":"r","content":"hi","client_msg_id":null}', LIMITS
    ) == PostRequest("r", "hi", None)
    assert parse_frame('{"action":"history","room_id":"r"}', LIMITS) == HistoryRequest(
        "r", None, 50
    )
    assert parse_frame(
        '{"action":"history","room_id":"r","before_seq":5,"limit":1}', LIMITS
    ) == HistoryRequest("r", 5, 1)
    # Content is limited in UTF-8 bytes: 4 emoji of 4 bytes fit in 16.
    assert parse_frame('{"action":"message","room_id":"r","content":"😀😀😀😀"}', LIMITS).content


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1,2]", "invalid_json"),
        ('"str"', "invalid_json"),
        ("{}", "invalid_field"),
        ('{"action": 5}', "invalid_field"),
        ('{"action": "dance"}', "unknown_action"),
        ('{"action": "join"}', "invalid_field"),
        ('{"action": "join", "room_id": 7}', "invalid_field"),
        ('{"action": "join", "room_id": ""}', "invalid_field"),
        ('{"action": "join", "room_id": "a@b"}', "invalid_field"),
        ('{"action": "join", "room_id": "has space"}', "invalid_field"),
        ('{"action": "join", "room_id": "' + "x" * 65 + '"}', "invalid_field"),
        ('{"action": "join", "room_id": "r", "since_seq": "3"}', "invalid_field"),
        ('{"action": "join", "room_id": "r", "since_seq": -1}', "invalid_field"),
        ('{"action": "join", "room_id": "r", "since_seq": true}', "invalid_field"),
        ('{"action": "join", "room_id": "r", "history": 101}', "invalid_field"),
        ('{"action": "join", "room_id": "r", "history": 1.5}', "invalid_field"),
        ('{"action": "message", "room_id": "r"}', "invalid_field"),
        ('{"action": "message", "room_id": "r", "content": 5}', "invalid_field"),
        ('{"action": "message", "room_id": "r", "content": ""}', "invalid_field"),
        ('{"action": "message", "room_id": "r", "content": "' + "x" * 17 + '"}', "too_large"),
        ('{"action": "message", "room_id": "r", "content": "😀😀😀😀x"}', "too_large"),
        (
            '{"action": "message", "room_id": "r", "content": "x", "client_msg_id": ""}',
            "invalid_field",
        ),
        (
            '{"action": "message", "room_id": "r", "content": "x", "client_msg_id": 3}',
            "invalid_field",
        ),
        (
            '{"action": "message", "room_id": "r", "content": "x", "client_msg_id": "'
            + "k" * 65
            + '"}',
            "invalid_field",
        ),
        ('{"action": "history", "room_id": "r", "limit": 0}', "invalid_field"),
        ('{"action": "history", "room_id": "r", "limit": 101}', "invalid_field"),
        ('{"action": "history", "room_id": "r", "before_seq": 0}', "invalid_field"),
        ('{"action": "leave", "room_id": null}', "invalid_field"),
    ],
)
def test_bad_frames(frame: str, code: str) -> None:
    assert error_of(frame).code == code


def test_binary_frame_is_unsupported() -> None:
    assert error_of(b'{"action":"ping"}').code == "unsupported_frame"


def test_errors_echo_well_formed_fields_only() -> None:
    err = error_of('{"action":"message","room_id":"r","content":"","client_msg_id":"k"}')
    assert err.to_frame() == {
        "type": "error",
        "code": "invalid_field",
        "message": err.message,
        "action": "message",
        "room_id": "r",
        "client_msg_id": "k",
    }
    err = error_of('{"action":"message","room_id":"bad room","content":"x"}')
    frame = err.to_frame()
    assert frame["action"] == "message" and "room_id" not in frame and "client_msg_id" not in frame
    assert "action" not in error_of("[]").to_frame()
    assert error_of('{"action":"nope"}').to_frame()["action"] == "nope"


def test_sent_at_format() -> None:
    assert format_sent_at(1_700_000_000_007) == "2023-11-14T22:13:20.007Z"
    assert format_sent_at(0) == "1970-01-01T00:00:00.000Z"


@given(st.lists(st.integers(-(10**12), 10**13), min_size=1, max_size=50))
def test_sent_at_is_the_same_whichever_second_was_formatted_before(stamps: list[int]) -> None:
    # format_sent_at caches each second's text: repeated, interleaved and
    # neighbouring seconds give what strftime gives for each one.
    for ms in stamps + [s + 1 for s in stamps] + stamps[::-1]:
        dt = datetime.fromtimestamp(ms // 1000, UTC)
        assert format_sent_at(ms) == f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"
