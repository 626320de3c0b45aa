"""The Quart application: HTTP routes and the ``/chat`` WebSocket.

Routes only translate: a frame is decoded into a command (``protocol``) and
handed to the room through the hub; replies reach the socket through its
:class:`Connection`. No route touches the store or the broker.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

from quart import Quart, Response, request, websocket

from . import metrics, wsping
from .api import api_blueprint, guard_read
from .auth import AuthError, Session, TokenVerifier, bearer
from .config import Settings
from .connection import Connection, TokenBucket
from .control import Control
from .errors import CLOSE_POLICY, CLOSE_TOKEN_EXPIRED, ChatError
from .fastsend import fast_sender_for
from .hub import Hub
from .protocol import (
    PROTOCOL_VERSION,
    HistoryCmd,
    JoinCmd,
    LeaveCmd,
    Limits,
    PingCmd,
    PostCmd,
    RefreshCmd,
    encode,
    parse_frame,
    refused,
    valid_room_id,
    valid_sender_id,
)
from .room import History, Join, Leave, Publish
from .validate import INT_MAX, parse_int
from .webclient import load_static

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# A connection that earns this many error frames within the window is closed
# with 1008: it is not a client making mistakes but one ignoring the answers.
_ABUSE_ERRORS = 200
_ABUSE_WINDOW_S = 10.0
_PONG = encode({"type": "pong"})
# An oversized frame's envelope is parsed up to this many times the frame limit
# (hypercorn's own cap, past which it closes with 1009, is 16 times it).
_ENVELOPE_CAP = 16
# How long a server-side close waits for the writer, then for the client's close frame.
_CLOSE_WAIT_S = 2.0


def _json(body: dict[str, Any] | str, status: int = 200) -> Response:
    text = body if isinstance(body, str) else encode(body)
    return Response(text, status=status, content_type="application/json")


def _refuse(status: int, code: str, message: str) -> Response:
    metrics.HANDSHAKES_REFUSED.labels(status=str(status)).inc()
    return _json({"error": code, "message": message}, status)


def _origin_allowed(settings: Settings, origin: str | None) -> bool:
    if origin is None or "*" in settings.allowed_origins:
        return True
    return origin in settings.allowed_origins


def create_app(
    settings: Settings | None = None,
    *,
    hub: Hub | None = None,
    migrate_on_start: bool = True,
) -> Quart:
    """Build the app; the hub starts in ``before_serving`` and stops in ``after_serving``."""
    settings = settings if settings is not None else Settings.from_env()
    wsping.install()  # also when hypercorn serves this app directly (idempotent)
    hub = hub if hub is not None else Hub(settings)
    app = Quart(__name__, static_folder=None)  # our own /static: from memory, not disk
    static = load_static()
    app.register_blueprint(static.blueprint())
    app.config["QUARTCHAT_SETTINGS"] = settings
    app.extensions["quartchat"] = hub
    verifier = TokenVerifier.from_settings(settings) if settings.auth == "jwt" else None
    control = Control(hub)
    app.register_blueprint(api_blueprint(hub, settings, control))
    limits = Limits(
        max_content=settings.max_content,
        history_max=settings.history_max,
        refresh=verifier is not None,
    )
    frame_limit = settings.frame_limit
    welcome_limits = {
        "max_content": settings.max_content,
        "max_rooms": settings.max_rooms,
        "rate_per_s": settings.rate_per_s,
    }

    @app.before_serving
    async def _start() -> None:
        if migrate_on_start:
            from .migrate import upgrade_async

            await upgrade_async(settings)
        await hub.start()
        await control.start()
        log.info(
            "quartchat serving as %s (store %s, broker %s)",
            settings.server_id,
            settings.database_url.split("://", 1)[0],
            settings.broker_url.split("://", 1)[0],
        )

    @app.after_serving
    async def _stop() -> None:
        await hub.drain()
        await control.stop()
        await hub.stop()

    # ---- HTTP -----------------------------------------------------------

    @app.get("/")
    async def index() -> Any:
        best = request.accept_mimetypes.best_match(["application/json", "text/html"])
        if best == "text/html":
            page = static.page()
            page.headers["Vary"] = "Accept"
            return page
        return _json(
            {
                "status": "draining" if hub.draining else "ok",
                "service": "quartchat",
                "server_id": settings.server_id,
                "protocol": PROTOCOL_VERSION,
                "connections": len(hub.connections),
                "rooms": len(hub.actors),
            }
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = await hub.ready()
        if problems:
            return _json({"status": "unavailable", "problems": problems}, 503)
        return _json({"status": "ready"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = await metrics.render_async()  # off the event loop
        return Response(body, content_type=content_type)

    @app.get("/api/rooms")
    async def api_rooms() -> Response:
        if (refusal := guard_read(settings, verifier, None)) is not None:
            return refusal
        rooms = await hub.rooms()
        return _json({"rooms": [{"room_id": r, "members": n} for r, n in rooms]})

    @app.get("/api/rooms/<room_id>/members")
    async def api_members(room_id: str) -> Response:
        if (refusal := guard_read(settings, verifier, room_id)) is not None:
            return refusal
        if not valid_room_id(room_id):
            return _json({"error": "invalid_field", "message": "bad room id"}, 400)
        return _json({"room_id": room_id, "members": await hub.members(room_id)})

    @app.get("/api/rooms/<room_id>/messages")
    async def api_messages(room_id: str) -> Response:
        if (refusal := guard_read(settings, verifier, room_id)) is not None:
            return refusal
        if not valid_room_id(room_id):
            return _json({"error": "invalid_field", "message": "bad room id"}, 400)
        try:
            before_seq = _int_arg("before_seq", 1)
            limit = _int_arg("limit", 1, settings.history_max)
        except ValueError as exc:
            return _json({"error": "invalid_field", "message": str(exc)}, 400)
        return _json(await hub.messages_page(room_id, before_seq, 50 if limit is None else limit))

    @app.errorhandler(ChatError)
    async def chat_error(error: ChatError) -> Response:
        status = 503 if error.code == "unavailable" else 400
        return _json({"error": error.code, "message": error.message}, status)

    @app.errorhandler(404)
    async def not_found(_: Any) -> Response:
        return _json({"error": "not_found", "message": "no such route"}, 404)

    @app.errorhandler(405)
    async def not_allowed(_: Any) -> Response:
        return _json({"error": "method_not_allowed", "message": "method not allowed"}, 405)

    # ---- WebSocket ------------------------------------------------------

    @app.websocket("/chat")
    async def chat() -> Any:
        if hub.draining:
            return _refuse(503, "draining", "server is shutting down; connect to another server")
        if not _origin_allowed(settings, websocket.headers.get("Origin")):
            return _refuse(403, "forbidden", "origin not allowed")
        grant = None
        if verifier is not None:
            # The query parameter wins over the header; sender_id is ignored.
            token = websocket.args.get("token")
            token = bearer(websocket.headers) if token is None else token
            if token is None:
                return _refuse(
                    401, "unauthorized", "a token is required (?token= or Authorization: Bearer)"
                )
            try:
                grant = verifier.verify(token)
            except AuthError as exc:
                return _refuse(401, "unauthorized", str(exc))
            sender_id: str | None = grant.sender_id
        else:
            sender_id = websocket.args.get("sender_id")
        if sender_id is None:
            return _refuse(400, "invalid_field", "sender_id query parameter is required")
        if not valid_sender_id(sender_id):
            return _refuse(400, "invalid_field", "sender_id must match ^[A-Za-z0-9_.@:-]{1,64}$")

        await websocket.accept()
        ws: Any = cast(Any, websocket)._get_current_object()  # the tasks below outlive the context
        conn = Connection(uuid.uuid4().hex, sender_id, queue_size=settings.outbound_queue)
        hub.connected(conn)
        welcome = {
            "type": "welcome",
            "sender_id": sender_id,
            "connection_id": conn.conn_id,
            "server_id": settings.server_id,
            "protocol": PROTOCOL_VERSION,
            "limits": welcome_limits,
        }
        session = None
        if verifier is not None and grant is not None:
            welcome["expires_at"] = grant.expires_at
            session = Session(
                verifier, grant, lambda: conn.close(CLOSE_TOKEN_EXPIRED, "token expired")
            )
        conn.send_frame(welcome)
        fast = fast_sender_for(ws) if settings.fast_writes else None
        writer = asyncio.create_task(conn.run_writer(ws, fast), name=f"writer:{conn.conn_id}")
        reader = asyncio.create_task(
            _read_loop(ws.receive, conn, session), name=f"reader:{conn.conn_id}"
        )
        try:
            await asyncio.wait([reader, writer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Runs on a client disconnect too (the handler is cancelled then).
            if session is not None:
                session.cancel()
            hub.disconnected(conn)
            try:
                if not conn.open:
                    # Closing on our side (1001, 4008, 1008): let the writer send the
                    # close frame, and keep reading (discarding) until the client answers
                    # it. A socket closed with unread input is reset, and the reset can
                    # destroy our close frame before the client reads it (1006).
                    await asyncio.wait([writer], timeout=_CLOSE_WAIT_S)
                    await asyncio.wait([reader], timeout=_CLOSE_WAIT_S)
            finally:
                # Also when the client goes away during that wait (this handler is
                # cancelled then): neither task may outlive the socket.
                reader.cancel()
                writer.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
        return None

    async def _read_loop(
        receive: Callable[[], Awaitable[str | bytes]], conn: Connection, session: Session | None
    ) -> None:
        bucket = TokenBucket(settings.rate_per_s, settings.rate_burst)
        errors: list[float] = []
        loop = asyncio.get_running_loop()
        while True:
            data = await receive()
            if not conn.open:
                continue  # closing: discard until the client's close frame arrives
            try:
                # Refused before parsing, but still saying which request failed: the
                # envelope (action, room_id, client_msg_id) is read by a bounded parse.
                if not bucket.take():
                    metrics.RATE_LIMITED.inc()
                    raise refused(
                        "rate_limited", "too many frames; slow down", data, limits, frame_limit
                    )
                if len(data) > frame_limit:
                    raise refused(
                        "too_large",
                        f"frame larger than {frame_limit} bytes",
                        data,
                        limits,
                        _ENVELOPE_CAP * frame_limit,
                    )
                command = parse_frame(data, limits)
                _dispatch(conn, command, session)
            except ChatError as error:
                conn.send_error(error)
                if error.code in ("unavailable", "internal"):
                    continue  # our trouble, not the client's: never counts as abuse
                now = loop.time()
                errors.append(now)
                while errors and errors[0] < now - _ABUSE_WINDOW_S:
                    errors.pop(0)
                if len(errors) >= _ABUSE_ERRORS:
                    log.warning(
                        "closing abusive connection",
                        extra={"conn_id": conn.conn_id, "sender_id": conn.sender_id},
                    )
                    conn.close(CLOSE_POLICY, "too many errors")

    def _forbid(
        session: Session | None,
        allowed: bool,
        action: str,
        room_id: str,
        client_msg_id: str | None = None,
    ) -> None:
        if session is not None and not allowed:
            raise ChatError(
                "forbidden",
                f"the token does not allow {action} in this room",
                action=action,
                room_id=room_id,
                client_msg_id=client_msg_id,
            )

    def _dispatch(conn: Connection, command: Any, session: Session | None = None) -> None:
        grant = session.grant if session is not None else None
        if isinstance(command, PingCmd):
            metrics.FRAMES_RECEIVED.labels(action="ping").inc()
            conn.send(_PONG)
        elif isinstance(command, PostCmd):
            metrics.FRAMES_RECEIVED.labels(action="message").inc()
            _forbid(
                session,
                grant is not None and grant.may_post(command.room_id),
                "message",
                command.room_id,
                command.client_msg_id,
            )
            if command.room_id not in conn.rooms:
                raise ChatError(
                    "not_joined",
                    "join the room before posting",
                    action="message",
                    room_id=command.room_id,
                    client_msg_id=command.client_msg_id,
                )
            try:
                hub.submit(command.room_id, Publish(conn, command.content, command.client_msg_id))
            except ChatError as error:
                error.action, error.room_id = "message", command.room_id
                error.client_msg_id = command.client_msg_id
                raise
        elif isinstance(command, JoinCmd):
            metrics.FRAMES_RECEIVED.labels(action="join").inc()
            _forbid(
                session,
                grant is not None and grant.may_read(command.room_id),
                "join",
                command.room_id,
            )
            if command.room_id not in conn.rooms and len(conn.rooms) >= settings.max_rooms:
                raise ChatError(
                    "too_many_rooms",
                    f"at most {settings.max_rooms} rooms per connection",
                    action="join",
                    room_id=command.room_id,
                )
            try:
                hub.submit(command.room_id, Join(conn, command.since_seq, command.history))
            except ChatError as error:
                error.action, error.room_id = "join", command.room_id
                raise
            conn.rooms.add(command.room_id)
        elif isinstance(command, LeaveCmd):
            metrics.FRAMES_RECEIVED.labels(action="leave").inc()
            if command.room_id not in conn.rooms:
                raise ChatError(
                    "not_joined", "not joined to this room", action="leave", room_id=command.room_id
                )
            conn.rooms.discard(command.room_id)
            hub.submit(command.room_id, Leave(conn))
        elif isinstance(command, HistoryCmd):
            metrics.FRAMES_RECEIVED.labels(action="history").inc()
            _forbid(
                session,
                grant is not None and grant.may_read(command.room_id),
                "history",
                command.room_id,
            )
            try:
                hub.submit(command.room_id, History(conn, command.before_seq, command.limit))
            except ChatError as error:
                error.action, error.room_id = "history", command.room_id
                raise
        elif isinstance(command, RefreshCmd) and session is not None and verifier is not None:
            metrics.FRAMES_RECEIVED.labels(action="refresh").inc()
            try:
                new = verifier.verify(command.token)
            except AuthError as exc:
                raise ChatError("unauthorized", str(exc), action="refresh") from None
            if new.sender_id != conn.sender_id:
                raise ChatError("unauthorized", "the token is for another sub", action="refresh")
            session.replace(new)
            conn.send_frame({"type": "refreshed", "expires_at": new.expires_at})
            for room_id in sorted(conn.rooms):  # after `refreshed`, one `left` per lost room
                if not new.may_read(room_id):
                    conn.rooms.discard(room_id)
                    hub.submit(room_id, Leave(conn, reason="forbidden"))

    return app


def _int_arg(name: str, lo: int, hi: int = INT_MAX) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    return parse_int(name, raw, lo, hi)  # ValueError saying why
