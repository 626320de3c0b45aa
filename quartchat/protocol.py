"""Wire protocol v1: client frames decoded into frozen commands, server frames encoded.

This module owns every rule of PROTOCOL.md about what a valid client frame is
and which error code a bad one gets. It knows nothing of rooms or sockets.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import orjson

from .errors import ChatError

__all__ = [
    "PROTOCOL_VERSION",
    "SENDER_ID_RE",
    "ROOM_ID_RE",
    "JoinCmd",
    "LeaveCmd",
    "PostCmd",
    "HistoryCmd",
    "PingCmd",
    "RefreshCmd",
    "Command",
    "Limits",
    "parse_frame",
    "encode",
    "message_frame",
    "format_sent_at",
    "valid_room_id",
    "valid_sender_id",
]

PROTOCOL_VERSION: Final = 1
SENDER_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")
ROOM_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ACTIONS: Final = frozenset({"join", "leave", "message", "history", "ping"})


@attrs.frozen
class JoinCmd:
    """``join``: enter a room, optionally replaying from ``since_seq`` or the last ``history``."""

    room_id: str
    since_seq: int | None = None
    history: int | None = None


@attrs.frozen
class LeaveCmd:
    """``leave``: stop receiving a room."""

    room_id: str


@attrs.frozen
class PostCmd:
    """``message``: post ``content`` to a joined room."""

    room_id: str
    content: str
    client_msg_id: str | None = None


@attrs.frozen
class HistoryCmd:
    """``history``: a page of stored messages older than ``before_seq``."""

    room_id: str
    before_seq: int | None = None
    limit: int = 50


@attrs.frozen
class PingCmd:
    """``ping``: answered with ``pong``."""


@attrs.frozen
class RefreshCmd:
    """``refresh`` (auth mode "jwt"): replace the connection's token."""

    token: str = attrs.field(repr=False)


Command = JoinCmd | LeaveCmd | PostCmd | HistoryCmd | PingCmd | RefreshCmd


@attrs.frozen
class Limits:
    """The per-connection limits a frame is checked against."""

    max_content: int = 4096
    history_max: int = 100
    refresh: bool = False  # auth mode "jwt": the `refresh` action exists


def valid_room_id(value: object) -> bool:
    """True for a string matching the room id rule."""
    return isinstance(value, str) and ROOM_ID_RE.match(value) is not None


def valid_sender_id(value: object) -> bool:
    """True for a string matching the sender id rule."""
    return isinstance(value, str) and SENDER_ID_RE.match(value) is not None


def _is_int(value: object) -> bool:
    # bool is an int subclass; `true` is not a sequence number.
    return isinstance(value, int) and not isinstance(value, bool)


class _Echo:
    """Collects the well-formed fields an error for this frame must echo."""

    def __init__(self, action: str, frame: dict[str, Any]) -> None:
        self.action = action
        room = frame.get("room_id")
        self.room_id = room if valid_room_id(room) else None
        cmid = frame.get("client_msg_id")
        self.client_msg_id = cmid if isinstance(cmid, str) and 1 <= len(cmid) <= 64 else None

    def error(self, code: str, message: str) -> ChatError:
        return ChatError(
            code,
            message,
            action=self.action,
            room_id=self.room_id,
            client_msg_id=self.client_msg_id,
        )


def _room_id(frame: dict[str, Any], echo: _Echo) -> str:
    room = frame.get("room_id")
    if room is None:
        raise echo.error("invalid_field", "room_id is required")
    if not valid_room_id(room):
        raise echo.error("invalid_field", "room_id must match ^[A-Za-z0-9_.:-]{1,64}$")
    assert isinstance(room, str)
    return room


def _opt_int(frame: dict[str, Any], name: str, lo: int, hi: int | None, echo: _Echo) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise echo.error("invalid_field", f"{name} must be an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise echo.error("invalid_field", f"{name} must be {bound}")
    return int(value)


def parse_frame(text: str | bytes, limits: Limits) -> Command:
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
    if action not in _ACTIONS and not (action == "refresh" and limits.refresh):
        raise ChatError("unknown_action", f"unknown action {action[:64]!r}", action=action[:64])
    echo = _Echo(action, frame)

    if action == "ping":
        return PingCmd()
    if action == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ChatError("invalid_field", "token is required and must be a string",
                            action="refresh")
        return RefreshCmd(token)
    room_id = _room_id(frame, echo)
    if action == "join":
        since_seq = _opt_int(frame, "since_seq", 0, None, echo)
        history = _opt_int(frame, "history", 0, limits.history_max, echo)
        return JoinCmd(room_id, since_seq, history)
    if action == "leave":
        return LeaveCmd(room_id)
    if action == "history":
        before_seq = _opt_int(frame, "before_seq", 1, None, echo)
        limit = _opt_int(frame, "limit", 1, limits.history_max, echo)
        return HistoryCmd(room_id, before_seq, 50 if limit is None else min(limit, 100))
    # action == "message"
    cmid = frame.get("client_msg_id")
    if cmid is not None and not (isinstance(cmid, str) and 1 <= len(cmid) <= 64):
        raise echo.error("invalid_field", "client_msg_id must be a string of 1..64 characters")
    content = frame.get("content")
    if not isinstance(content, str):
        raise echo.error("invalid_field", "content is required and must be a string")
    if not content:
        raise echo.error("invalid_field", "content must not be empty")
    # Cheap bound first: a str of n code points has at least n UTF-8 bytes.
    if len(content) > limits.max_content or len(content.encode("utf-8", "surrogatepass")) > limits.max_content:
        raise echo.error("too_large", f"content is larger than {limits.max_content} bytes")
    return PostCmd(room_id, content, cmid)


def encode(frame: dict[str, Any]) -> str:
    """Encode one server frame as JSON text."""
    return orjson.dumps(frame).decode()


def format_sent_at(ms: int) -> str:
    """RFC 3339 UTC with exactly three fractional digits and a ``Z``."""
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


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
