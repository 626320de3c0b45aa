"""Wire protocol v1: client frames decoded into frozen requests, server frames encoded.

This module owns every rule of PROTOCOL.md about what a valid client frame is,
which error code a bad one gets and what that error echoes (the frame's
well-formed envelope; a decoded request's is ``Request.echo``). It knows
nothing of rooms or sockets.

Names: a decoded client frame is a *request* (``JoinRequest`` ...); the
session turns it into the room actor's *command* (:mod:`.room.commands`:
``Join`` ...), which adds the connection. The wire action ``message`` is a
*post* everywhere in the code (``PostRequest``, ``room.Post``, the client's
``Post``); the broker's ``publish`` is the pub/sub verb for any payload.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Literal, get_args

import attrs
import orjson

from .errors import NO_ECHO, ChatError, Echo, ErrorCode
from .validate import (
    ID_PATTERN,
    INT_MAX,
    ROOM_ID_RE,
    SENDER_ID_RE,
    check_int,
    valid_client_msg_id,
    valid_room_id,
    valid_sender_id,
)

__all__ = [
    "HISTORY_PAGE",
    "PROTOCOL_VERSION",
    "ROOM_ID_RE",
    "SENDER_ID_RE",
    "Action",
    "HistoryRequest",
    "JoinRequest",
    "LeaveRequest",
    "Limits",
    "PingRequest",
    "PostRequest",
    "RefreshRequest",
    "Request",
    "encode",
    "format_sent_at",
    "message_frame",
    "parse_frame",
    "refused",
    "valid_room_id",
    "valid_sender_id",
]

PROTOCOL_VERSION: Final = 1
HISTORY_PAGE: Final = 50  # messages in a history page when `limit` is not given
# Every client action; `refresh` exists in auth mode jwt only (Limits.refresh).
Action = Literal["join", "leave", "message", "history", "ping", "refresh"]
_ACTIONS: Final = frozenset(get_args(Action)) - {"refresh"}


class _Envelope:
    """What every request has: its ``action``, and the envelope its errors echo."""

    __slots__ = ()
    action: ClassVar[Action]

    @property
    def echo(self) -> Echo:
        """The action, and the request's ``room_id`` / ``client_msg_id`` where it has them."""
        return Echo(
            self.action, getattr(self, "room_id", None), getattr(self, "client_msg_id", None)
        )


@attrs.frozen
class JoinRequest(_Envelope):
    """``join``: enter a room, optionally replaying from ``since_seq`` or the last ``history``."""

    action: ClassVar[Action] = "join"

    room_id: str
    since_seq: int | None = None
    history: int | None = None


@attrs.frozen
class LeaveRequest(_Envelope):
    """``leave``: stop receiving a room."""

    action: ClassVar[Action] = "leave"

    room_id: str


@attrs.frozen
class PostRequest(_Envelope):
    """``message``: post ``content`` to a joined room."""

    action: ClassVar[Action] = "message"

    room_id: str
    content: str
    client_msg_id: str | None = None


@attrs.frozen
class HistoryRequest(_Envelope):
    """``history``: a page of stored messages older than ``before_seq``."""

    action: ClassVar[Action] = "history"

    room_id: str
    before_seq: int | None = None
    limit: int = HISTORY_PAGE


@attrs.frozen
class PingRequest(_Envelope):
    """``ping``: answered with ``pong``."""

    action: ClassVar[Action] = "ping"


@attrs.frozen
class RefreshRequest(_Envelope):
    """``refresh`` (auth mode "jwt"): replace the connection's token."""

    action: ClassVar[Action] = "refresh"

    token: str = attrs.field(repr=False)


Request = JoinRequest | LeaveRequest | PostRequest | HistoryRequest | PingRequest | RefreshRequest


@attrs.frozen
class Limits:
    """The per-connection limits a frame is checked against."""

    max_content: int = 4096
    history_max: int = 100
    refresh: bool = False  # auth mode "jwt": the `refresh` action exists


def _frame_echo(action: str, frame: dict[str, Any]) -> Echo:
    """What an error for a frame of a known ``action`` echoes: the action, and
    ``room_id`` / ``client_msg_id`` when the frame carries them well formed."""
    room = frame.get("room_id")
    cmid = frame.get("client_msg_id")
    return Echo(
        action,
        room if valid_room_id(room) else None,
        cmid if valid_client_msg_id(cmid) else None,
    )


def _room_id(frame: dict[str, Any], echo: Echo) -> str:
    room = frame.get("room_id")
    if room is None:
        raise echo.error("invalid_field", "room_id is required")
    if not valid_room_id(room):
        raise echo.error("invalid_field", f"room_id must match ^{ID_PATTERN}$")
    assert isinstance(room, str)
    return room


def _opt_int(frame: dict[str, Any], name: str, lo: int, hi: int, echo: Echo) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    try:
        return check_int(name, value, lo, hi)
    except ValueError as exc:
        raise echo.error("invalid_field", str(exc)) from None


def _known(action: object, limits: Limits) -> bool:
    return isinstance(action, str) and (
        action in _ACTIONS or (action == "refresh" and limits.refresh)
    )


def refused(
    code: ErrorCode, message: str, text: str | bytes, limits: Limits, max_bytes: int
) -> ChatError:
    """The error for a frame refused before it is parsed (``rate_limited``, an
    oversized frame's ``too_large``), echoing the frame's envelope.

    The envelope is read cheaply: only a text frame of at most ``max_bytes``
    characters is parsed, and only its ``action`` (when known), ``room_id`` and
    ``client_msg_id`` (when well formed, by the same validators as
    :func:`parse_frame`) are kept. Anything else echoes nothing.
    """
    echo = NO_ECHO
    if isinstance(text, str) and len(text) <= max_bytes:
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            frame = None
        if isinstance(frame, dict):
            action = frame.get("action")
            if _known(action, limits):
                assert isinstance(action, str)
                echo = _frame_echo(action, frame)
    return echo.error(code, message)


def parse_frame(text: str | bytes, limits: Limits) -> Request:
    """Decode one client text frame into a command, or raise :class:`ChatError`."""
    if isinstance(text, bytes):
        raise ChatError("unsupported_frame", "binary frames are not supported; send JSON text")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ChatError("invalid_json", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ChatError("invalid_json", "frame must be a JSON object")
    action = frame.get("action")
    if not isinstance(action, str):
        raise ChatError("invalid_field", "action is required and must be a string")
    if not _known(action, limits):
        raise Echo(action[:64]).error("unknown_action", f"unknown action {action[:64]!r}")
    echo = _frame_echo(action, frame)

    if action == "ping":
        return PingRequest()
    if action == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            # The request's own envelope: a refresh has no room_id.
            raise Echo("refresh").error("invalid_field", "token is required and must be a string")
        return RefreshRequest(token)
    room_id = _room_id(frame, echo)
    if action == "join":
        since_seq = _opt_int(frame, "since_seq", 0, INT_MAX, echo)
        history = _opt_int(frame, "history", 0, limits.history_max, echo)
        return JoinRequest(room_id, since_seq, history)
    if action == "leave":
        return LeaveRequest(room_id)
    if action == "history":
        before_seq = _opt_int(frame, "before_seq", 1, INT_MAX, echo)
        limit = _opt_int(frame, "limit", 1, limits.history_max, echo)
        return HistoryRequest(
            room_id, before_seq, HISTORY_PAGE if limit is None else min(limit, 100)
        )
    # What is left is a post (the action "message").
    cmid = frame.get("client_msg_id")
    if cmid is not None and not valid_client_msg_id(cmid):
        raise echo.error("invalid_field", "client_msg_id must be a string of 1..64 characters")
    content = frame.get("content")
    if not isinstance(content, str):
        raise echo.error("invalid_field", "content is required and must be a string")
    if not content:
        raise echo.error("invalid_field", "content must not be empty")
    # Cheap bound first: a str of n code points has at least n UTF-8 bytes.
    if (
        len(content) > limits.max_content
        or len(content.encode("utf-8", "surrogatepass")) > limits.max_content
    ):
        raise echo.error("too_large", f"content is larger than {limits.max_content} bytes")
    return PostRequest(room_id, content, cmid)


def encode(frame: dict[str, Any] | str) -> str:
    """Encode one server frame (or one JSON string value) as JSON text."""
    return orjson.dumps(frame).decode()


def format_sent_at(ms: int) -> str:
    """RFC 3339 UTC with exactly three fractional digits and a ``Z``."""
    return f"{_utc_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=256)
def _utc_second(second: int) -> str:
    # Every message of the same second shares this text: strftime is most of the cost.
    return f"{datetime.fromtimestamp(second, UTC):%Y-%m-%dT%H:%M:%S}"


def message_frame(
    *,
    room_id: str,
    seq: int,
    id: str,
    sender_id: str,
    content: str,
    sent_at_ms: int,
    client_msg_id: str | None,
) -> dict[str, Any]:
    """The ``message`` frame (also the element of ``history.messages``)."""
    frame: dict[str, Any] = {
        "type": "message",
        "room_id": room_id,
        "seq": seq,
        "id": id,
        "sender_id": sender_id,
        "content": content,
        "sent_at": format_sent_at(sent_at_ms),
    }
    if client_msg_id is not None:
        frame["client_msg_id"] = client_msg_id
    return frame
