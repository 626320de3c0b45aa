"""The HTTP read routes and the JSON answers every HTTP route gives.

Owns ``GET /`` (the web client's page for browsers, a status object
otherwise), ``/healthz``, ``/readyz``, ``/metrics`` and the read API
(``/api/rooms``, a room's ``members`` and ``messages``) with its credential
check in auth mode jwt (:func:`guard_read`). Routes only translate: they ask
the hub, never the store or the broker. The server API (writes) is
:mod:`quartchat.api`; the ``/chat`` socket is :mod:`quartchat.session`.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from . import exposition
from .auth import AuthError, TokenVerifier, api_key_matches, bearer
from .config import Settings
from .hub import Hub
from .protocol import HISTORY_PAGE, PROTOCOL_VERSION, encode
from .validate import INT_MAX, parse_int, valid_room_id
from .webclient import StaticFiles

__all__ = ["error_response", "guard_read", "json_response", "routes_blueprint"]


def json_response(body: dict[str, Any] | str, status: int = 200) -> Response:
    """A JSON answer: an object, or text that is JSON already."""
    text = body if isinstance(body, str) else encode(body)
    return Response(text, status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    """The body of every refused HTTP request: ``{"error": CODE, "message": TEXT}``."""
    return json_response({"error": code, "message": message}, status)


def guard_read(
    settings: Settings, verifier: TokenVerifier | None, room_id: str | None
) -> Response | None:
    """Who may use the read routes in jwt mode: the API key, or (for one room) a bearer
    token whose ``rooms`` allow it. None means go ahead; otherwise the refusal.

    ``room_id`` None is ``GET /api/rooms``: the API key only. A bad room id is left
    to the route (400) once the caller is known.
    """
    if settings.auth != "jwt":
        return None
    credential = bearer(request.headers)
    if credential is None:
        return error_response(401, "unauthorized", "send Authorization: Bearer <token or API key>")
    if api_key_matches(settings.api_key, credential):
        return None
    if room_id is None or verifier is None:
        return error_response(401, "unauthorized", "this route needs the API key")
    try:
        grant = verifier.verify(credential)
    except AuthError as exc:
        return error_response(401, "unauthorized", str(exc))
    if valid_room_id(room_id) and not grant.may_read(room_id):
        return error_response(403, "forbidden", "the token does not allow this room")
    return None


def _int_arg(name: str, lo: int, hi: int = INT_MAX) -> int | None:
    """An optional integer query parameter; ValueError saying why when it is bad."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    return parse_int(name, raw, lo, hi)


def routes_blueprint(
    hub: Hub, settings: Settings, verifier: TokenVerifier | None, static: StaticFiles
) -> Blueprint:
    """The read routes of one app (its hub, settings and, in jwt mode, token verifier)."""
    routes = Blueprint("routes", __name__)

    @routes.get("/")
    async def index() -> Response:
        best = request.accept_mimetypes.best_match(["application/json", "text/html"])
        if best == "text/html":
            page = static.page()
            page.headers["Vary"] = "Accept"
            return page
        return json_response(
            {
                "status": "draining" if hub.draining else "ok",
                "service": "quartchat",
                "server_id": settings.server_id,
                "protocol": PROTOCOL_VERSION,
                "connections": len(hub.connections),
                "rooms": len(hub.actors),
            }
        )

    @routes.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @routes.get("/readyz")
    async def readyz() -> Response:
        problems = await hub.reads.ready(draining=hub.draining)
        if problems:
            return json_response({"status": "unavailable", "problems": problems}, 503)
        return json_response({"status": "ready"})

    @routes.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = await exposition.render_async()  # off the event loop
        return Response(body, content_type=content_type)

    @routes.get("/api/rooms")
    async def api_rooms() -> Response:
        if (refusal := guard_read(settings, verifier, None)) is not None:
            return refusal
        rooms = await hub.reads.rooms()
        return json_response({"rooms": [{"room_id": r, "members": n} for r, n in rooms]})

    @routes.get("/api/rooms/<room_id>/members")
    async def api_members(room_id: str) -> Response:
        if (refusal := guard_read(settings, verifier, room_id)) is not None:
            return refusal
        if not valid_room_id(room_id):
            return error_response(400, "invalid_field", "bad room id")
        return json_response({"room_id": room_id, "members": await hub.reads.members(room_id)})

    @routes.get("/api/rooms/<room_id>/messages")
    async def api_messages(room_id: str) -> Response:
        if (refusal := guard_read(settings, verifier, room_id)) is not None:
            return refusal
        if not valid_room_id(room_id):
            return error_response(400, "invalid_field", "bad room id")
        try:
            before_seq = _int_arg("before_seq", 1)
            limit = _int_arg("limit", 1, settings.history_max)
        except ValueError as exc:
            return error_response(400, "invalid_field", str(exc))
        page = await hub.reads.messages_page(
            room_id, before_seq, HISTORY_PAGE if limit is None else limit
        )
        return json_response(page)

    return routes
