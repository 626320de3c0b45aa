"""The frames a room sends, built in one place: messages (encoded once per
row, shared by every member and by history pages), acks, joined, presence
(from the broker's presence events, which carry no frame) and left."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..protocol import encode, message_frame
from ..store import StoredMessage

__all__ = ["ack_frame", "encode_row", "joined_frame", "left_frame", "page_json", "presence_frame"]


def encode_row(row: StoredMessage) -> str:
    """The ``message`` frame of a stored row, as JSON text."""
    return encode(
        message_frame(
            room_id=row.room_id,
            seq=row.seq,
            id=row.id,
            sender_id=row.sender_id,
            content=row.content,
            sent_at_ms=row.sent_at_ms,
            client_msg_id=row.client_msg_id,
        )
    )


def page_json(
    room_id: str, rows: Sequence[StoredMessage], has_more: bool, *, frame_type: str | None = None
) -> str:
    """A history page as JSON text, each stored row encoded like its ``message`` frame.

    Shared by the ``history`` frame and ``GET /api/rooms/<id>/messages``; the
    text is assembled so each row is encoded once.
    """
    head = f'"type":{encode(frame_type)},' if frame_type else ""
    body = ",".join(encode_row(row) for row in rows)
    return (
        f'{{{head}"room_id":{encode(room_id)},"messages":[{body}],'
        f'"has_more":{"true" if has_more else "false"}}}'
    )


def ack_frame(row: StoredMessage) -> dict[str, Any]:
    return {
        "type": "ack",
        "room_id": row.room_id,
        "seq": row.seq,
        "id": row.id,
        "client_msg_id": row.client_msg_id,
    }


def joined_frame(room_id: str, last_seq: int, members: Sequence[str]) -> dict[str, Any]:
    return {"type": "joined", "room_id": room_id, "last_seq": last_seq, "members": list(members)}


def presence_frame(room_id: str, sender_id: str, event: str) -> dict[str, Any]:
    return {"type": "presence", "room_id": room_id, "event": event, "sender_id": sender_id}


def left_frame(room_id: str, reason: str | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "left", "room_id": room_id}
    if reason is not None:
        frame["reason"] = reason
    return frame
