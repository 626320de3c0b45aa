"""The server API for the application's backend: publish, disconnect, kick.

Enabled by ``QUARTCHAT_API_KEY`` (compared in constant time); without it these
routes answer 404, with a wrong or missing key 401. Publishing goes through
the hub like a socket post (same store-then-deliver path, same order, same
retry key); disconnect and kick travel on the broker (:mod:`quartchat.control`)
so they reach every server. Routes only translate: no store, no broker here.
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Blueprint, Response, request

from .auth import api_key_matches, bearer
from .config import Settings
from .control import Control
from .errors import ChatError
from .hub import Hub
from .protocol import format_sent_at, valid_room_id, valid_sender_id
from .routes import error_response, json_response
from .store import StoredMessage
from .validate import ID_PATTERN, SENDER_ID_PATTERN, valid_client_msg_id

__all__ = ["api_blueprint"]

_ACCEPTED = {"status": "accepted"}


def _message_json(row: StoredMessage) -> dict[str, Any]:
    return {
        "room_id": row.room_id,
        "seq": row.seq,
        "id": row.id,
        "sender_id": row.sender_id,
        "content": row.content,
        "sent_at": format_sent_at(row.sent_at_ms),
        "client_msg_id": row.client_msg_id,
    }


async def _body(limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise ChatError("too_large", f"body larger than {limit} bytes")
    data = await request.get_data(cache=False, as_text=False)
    if len(data) > limit:
        raise ChatError("too_large", f"body larger than {limit} bytes")
    try:
        body = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        raise ChatError("invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ChatError("invalid_json", "the body must be a JSON object")
    return body


def _sender(value: object) -> str:
    if not valid_sender_id(value):
        raise ChatError("invalid_field", f"sender_id must match ^{SENDER_ID_PATTERN}$")
    assert isinstance(value, str)
    return value


def _room(value: str) -> str:
    if not valid_room_id(value):
        raise ChatError("invalid_field", f"room_id must match ^{ID_PATTERN}$")
    return value


def api_blueprint(hub: Hub, settings: Settings, control: Control) -> Blueprint:
    """The server-API routes (always registered, so an unconfigured API is 404, not 405)."""
    api = Blueprint("server_api", __name__)
    limit = settings.frame_limit

    @api.before_request
    async def _authenticate() -> Response | None:
        if settings.api_key is None:
            return error_response(404, "not_found", "no such route")
        if not api_key_matches(settings.api_key, bearer(request.headers)):
            return error_response(401, "unauthorized", "missing or wrong API key")
        return None

    @api.post("/api/rooms/<room_id>/messages")
    async def publish(room_id: str) -> Response:
        room = _room(room_id)
        body = await _body(limit)
        sender = _sender(body.get("sender_id"))
        content = body.get("content")
        if not isinstance(content, str) or not content:
            raise ChatError("invalid_field", "content is required: a non-empty string")
        if len(content.encode("utf-8", "surrogatepass")) > settings.max_content:
            raise ChatError("too_large", f"content is larger than {settings.max_content} bytes")
        cmid = body.get("client_msg_id")
        if cmid is not None and not valid_client_msg_id(cmid):
            raise ChatError("invalid_field", "client_msg_id must be a string of 1..64 characters")
        row, created = await hub.post(room, sender, content, cmid)
        return json_response(_message_json(row), 201 if created else 200)

    @api.post("/api/users/<sender_id>/disconnect")
    async def disconnect(sender_id: str) -> Response:
        await control.disconnect(_sender(sender_id))
        return json_response(_ACCEPTED, 202)

    @api.post("/api/rooms/<room_id>/kick")
    async def kick(room_id: str) -> Response:
        room = _room(room_id)
        body = await _body(limit)
        await control.kick(room, _sender(body.get("sender_id")))
        return json_response(_ACCEPTED, 202)

    return api
