"""The ``/chat`` WebSocket: the handshake, then one :class:`ChatSession` per socket.

The handshake refuses with a plain HTTP answer (draining, Origin, token,
sender id) before the one ``websocket.accept()``. A session owns its socket's
read loop (rate limit and frame limit before parsing, then
:func:`~quartchat.protocol.parse_frame`), the dispatch of each decoded command
to the hub, the error budget (1008 for a client that ignores its errors), and
the one cleanup path when the socket ends. It only translates: rooms are
reached through the hub, and frames leave through the :class:`Connection`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

from quart import Blueprint, Response, websocket

from . import metrics
from .asgi_ws import receiver
from .auth import AuthError, Grant, Session, TokenVerifier, bearer
from .config import Settings
from .connection import Connection, TokenBucket
from .errors import ChatError, CloseCode, ErrorCode
from .fastsend import decline_compression, fast_sender_for
from .hub import Hub
from .protocol import (
    PROTOCOL_VERSION,
    HistoryRequest,
    JoinRequest,
    LeaveRequest,
    Limits,
    PingRequest,
    PostRequest,
    RefreshRequest,
    Request,
    encode,
    parse_frame,
    refused,
    valid_sender_id,
)
from .room import History, Join, Leave, Post
from .routes import error_response
from .validate import SENDER_ID_PATTERN

__all__ = ["ChatEndpoint", "ChatSession", "ErrorBudget", "chat_blueprint"]

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
# Our trouble, not the client's: these never count against the error budget.
_NOT_THE_CLIENTS: frozenset[ErrorCode] = frozenset({"unavailable", "internal"})


class ErrorBudget:
    """Client errors within a sliding window; spent means close the socket with 1008."""

    def __init__(self, limit: int = _ABUSE_ERRORS, window_s: float = _ABUSE_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: collections.deque[float] | None = None  # made on the first error

    def spend(self, now: float) -> bool:
        """Count one error at ``now``; True when the window now holds ``limit`` of them."""
        if self._times is None:
            self._times = collections.deque()
        times = self._times
        times.append(now)
        while times and times[0] < now - self.window_s:
            times.popleft()
        return len(times) >= self.limit


class _CloseWatch:
    """Ends a session's read loop, which runs in the socket's handler task, after our close.

    Once we close a socket (1001, 4008, 1008, a kick) the read loop keeps reading,
    discarding, until the client answers our close frame: a socket closed with
    unread input is reset, and the reset can destroy our close frame before the
    client reads it (1006). hypercorn then ends the socket and Quart cancels the
    handler. A client that never answers is cut off here: _CLOSE_WAIT_S after the
    writer has sent the close, 2 x _CLOSE_WAIT_S after the close began if the
    writer never gets there; a writer that ends while the socket is open (it
    failed) ends the session at once.
    """

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._timer: asyncio.TimerHandle | None = None
        self._off = False
        self.fired = False

    def closing(self) -> None:
        self._within(2 * _CLOSE_WAIT_S)

    def writer_done(self, still_open: bool) -> None:
        """The connection's writing is over: the close was sent, or a send failed."""
        self._within(0.0 if still_open else _CLOSE_WAIT_S)

    def disarm(self) -> None:
        """For good: the session is ending (its writer's end is no news any more)."""
        self._off = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _within(self, delay: float) -> None:
        if self._off or self.fired or self._task.done():
            return
        loop = self._task.get_loop()
        when = loop.time() + delay
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self._task.done():
            self.fired = True
            self._task.cancel()


class ChatEndpoint:
    """What every socket of one app shares: its hub, settings, limits and token verifier."""

    def __init__(self, hub: Hub, settings: Settings, verifier: TokenVerifier | None) -> None:
        self.hub = hub
        self.settings = settings
        self.verifier = verifier
        self.limits = Limits(
            max_content=settings.max_content,
            history_max=settings.history_max,
            refresh=verifier is not None,
        )
        self.welcome_limits = {
            "max_content": settings.max_content,
            "max_rooms": settings.max_rooms,
            "rate_per_s": settings.rate_per_s,
        }

    async def handle(self) -> Response | None:
        """The ``/chat`` route: a refusal as an HTTP answer, or the session until it ends."""
        if self.hub.draining:
            return _refuse(503, "draining", "server is shutting down; connect to another server")
        if not self._origin_allowed(websocket.headers.get("Origin")):
            return _refuse(403, "forbidden", "origin not allowed")
        identity = self._identify()
        if isinstance(identity, Response):
            return identity
        sender_id, grant = identity

        # ---- the one place the socket is accepted -----------------------
        ws: Any = cast(Any, websocket)._get_current_object()  # the tasks outlive the context
        if not self.settings.ws_compression:
            decline_compression(ws)  # plain frames: every socket can take prepared bytes
        await websocket.accept()
        await ChatSession(self, ws, sender_id, grant).run()
        return None

    def _origin_allowed(self, origin: str | None) -> bool:
        allowed = self.settings.allowed_origins
        return origin is None or "*" in allowed or origin in allowed

    def _identify(self) -> tuple[str, Grant | None] | Response:
        """The sender (and in jwt mode the grant) a handshake names, or its refusal."""
        grant = None
        if self.verifier is not None:
            # The query parameter wins over the header; sender_id is ignored.
            token = websocket.args.get("token")
            token = bearer(websocket.headers) if token is None else token
            if token is None:
                return _refuse(
                    401, "unauthorized", "a token is required (?token= or Authorization: Bearer)"
                )
            try:
                grant = self.verifier.verify(token)
            except AuthError as exc:
                return _refuse(401, "unauthorized", str(exc))
            sender_id: str | None = grant.sender_id
        else:
            sender_id = websocket.args.get("sender_id")
        if sender_id is None:
            return _refuse(400, "invalid_field", "sender_id query parameter is required")
        if not valid_sender_id(sender_id):
            return _refuse(400, "invalid_field", f"sender_id must match ^{SENDER_ID_PATTERN}$")
        return sender_id, grant


def _refuse(status: int, code: str, message: str) -> Response:
    metrics.HANDSHAKES_REFUSED.labels(status=str(status)).inc()
    return error_response(status, code, message)


class ChatSession:
    """One accepted socket: its connection, reader and writer tasks, and its token session."""

    def __init__(
        self, endpoint: ChatEndpoint, ws: Any, sender_id: str, grant: Grant | None
    ) -> None:
        self.endpoint = endpoint
        self.hub = endpoint.hub
        self.ws = ws
        settings = endpoint.settings
        self.conn = Connection(uuid.uuid4().hex, sender_id, queue_size=settings.outbound_queue)
        self.auth: Session | None = None  # auth mode jwt: the current grant and its timer
        self.expires_at: str | None = None  # of the handshake's token, for the welcome
        if endpoint.verifier is not None and grant is not None:
            self.auth = Session(endpoint.verifier, grant, self._token_expired)
            self.expires_at = grant.expires_at
        self.bucket = TokenBucket(settings.rate_per_s, settings.rate_burst)
        self.budget = ErrorBudget()

    def _token_expired(self) -> None:
        self.conn.close(CloseCode.TOKEN_EXPIRED, "token expired")

    def _welcome(self) -> dict[str, Any]:
        settings = self.endpoint.settings
        welcome: dict[str, Any] = {
            "type": "welcome",
            "sender_id": self.conn.sender_id,
            "connection_id": self.conn.conn_id,
            "server_id": settings.server_id,
            "protocol": PROTOCOL_VERSION,
            "limits": self.endpoint.welcome_limits,
        }
        if self.expires_at is not None:
            welcome["expires_at"] = self.expires_at
        return welcome

    async def run(self) -> None:
        """Welcome, then read in this (the handler's) task until either side ends;
        then :meth:`_cleanup`. Frames go out directly, or through the connection's
        writer task while it has something queued."""
        conn = self.conn
        handler = asyncio.current_task()
        assert handler is not None
        watch = _CloseWatch(handler)
        conn.on_close = watch.closing
        fast = fast_sender_for(self.ws) if self.endpoint.settings.fast_writes else None
        conn.attach(self.ws, fast, on_end=watch.writer_done)
        self.hub.connected(conn)
        conn.send_frame(self._welcome())  # the first frame: nothing else knows conn yet
        try:
            await self.read_loop(receiver(self.ws))
        except asyncio.CancelledError:
            # Cancelled by the watch (our close had its time): the session ends here.
            # Cancelled by anyone else (the client went away: Quart cancels the
            # handler): that goes on after the cleanup.
            if not watch.fired or handler.uncancel() > 0:
                raise
        finally:
            watch.disarm()
            conn.on_close = None
            await self._cleanup()

    async def _cleanup(self) -> None:
        """The one way a session ends: token timer off, out of the hub, writing stopped."""
        if self.auth is not None:
            self.auth.cancel()
        self.hub.disconnected(self.conn)
        try:
            if not self.conn.open:
                # Closing on our side and the read loop is done: give the writer
                # its time to send the close frame.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_WAIT_S):
                        await self.conn.wait_closed()
        finally:
            # Also when the client goes away during that wait (this handler is
            # cancelled then): no writer may outlive the socket.
            await self.conn.detach()

    async def read_loop(self, receive: Callable[[], Awaitable[str | bytes]]) -> None:
        """Each frame received: refused, or decoded and dispatched; errors answered."""
        loop = asyncio.get_running_loop()
        while True:
            data = await receive()
            if not self.conn.open:
                continue  # closing: discard until the client's close frame arrives
            try:
                self.dispatch(self._decode(data))
            except ChatError as error:
                self.conn.send_error(error)
                if error.code not in _NOT_THE_CLIENTS and self.budget.spend(loop.time()):
                    log.warning(
                        "closing abusive connection",
                        extra={"conn_id": self.conn.conn_id, "sender_id": self.conn.sender_id},
                    )
                    self.conn.close(CloseCode.POLICY, "too many errors")

    def _decode(self, data: str | bytes) -> Request:
        """The frame's command; ChatError for a refused or malformed frame."""
        limits = self.endpoint.limits
        frame_limit = self.endpoint.settings.frame_limit
        # Refused before parsing, but still saying which request failed: the
        # envelope (action, room_id, client_msg_id) is read by a bounded parse.
        if not self.bucket.take():
            metrics.RATE_LIMITED.inc()
            raise refused("rate_limited", "too many frames; slow down", data, limits, frame_limit)
        if len(data) > frame_limit:
            raise refused(
                "too_large",
                f"frame larger than {frame_limit} bytes",
                data,
                limits,
                _ENVELOPE_CAP * frame_limit,
            )
        return parse_frame(data, limits)

    def dispatch(self, command: Request) -> None:
        """Carry out one request; any ChatError it raises echoes the request's envelope."""
        metrics.FRAMES_RECEIVED.labels(action=command.action).inc()
        try:
            match command:
                case PingRequest():
                    self.conn.send(_PONG)
                case PostRequest():
                    self._post(command)
                case JoinRequest():
                    self._join(command)
                case LeaveRequest():
                    self._leave(command)
                case HistoryRequest():
                    self._history(command)
                case RefreshRequest():
                    self._refresh(command)
        except ChatError as error:
            # Raised without an envelope (here, by the hub or the room's inbox):
            # answered with the request's.
            raise command.echo.error(error.code, error.message) from error

    def _allow(self, allowed: Callable[[Grant], bool], what: str) -> None:
        """In jwt mode, refuse what the connection's current grant does not allow."""
        if self.auth is not None and not allowed(self.auth.grant):
            raise ChatError("forbidden", f"the token does not allow {what} in this room")

    def _post(self, command: PostRequest) -> None:
        self._allow(lambda grant: grant.may_post(command.room_id), "message")
        if command.room_id not in self.conn.rooms:
            raise ChatError("not_joined", "join the room before posting")
        self.hub.submit(command.room_id, Post(self.conn, command.content, command.client_msg_id))

    def _join(self, command: JoinRequest) -> None:
        self._allow(lambda grant: grant.may_read(command.room_id), "join")
        rooms, max_rooms = self.conn.rooms, self.endpoint.settings.max_rooms
        if command.room_id not in rooms and len(rooms) >= max_rooms:
            raise ChatError("too_many_rooms", f"at most {max_rooms} rooms per connection")
        self.hub.submit(command.room_id, Join(self.conn, command.since_seq, command.history))
        rooms.add(command.room_id)

    def _leave(self, command: LeaveRequest) -> None:
        if command.room_id not in self.conn.rooms:
            raise ChatError("not_joined", "not joined to this room")
        self.conn.rooms.discard(command.room_id)
        self.hub.submit(command.room_id, Leave(self.conn))

    def _history(self, command: HistoryRequest) -> None:
        self._allow(lambda grant: grant.may_read(command.room_id), "history")
        self.hub.submit(command.room_id, History(self.conn, command.before_seq, command.limit))

    def _refresh(self, command: RefreshRequest) -> None:
        verifier = self.endpoint.verifier
        # parse_frame knows `refresh` only in jwt mode, where every session has a token.
        assert verifier is not None and self.auth is not None
        try:
            new = verifier.verify(command.token)
        except AuthError as exc:
            raise ChatError("unauthorized", str(exc)) from None
        if new.sender_id != self.conn.sender_id:
            raise ChatError("unauthorized", "the token is for another sub")
        self.auth.replace(new)
        self.conn.send_frame({"type": "refreshed", "expires_at": new.expires_at})
        for room_id in sorted(self.conn.rooms):  # after `refreshed`, one `left` per lost room
            if not new.may_read(room_id):
                self.conn.rooms.discard(room_id)
                self.hub.submit(room_id, Leave(self.conn, reason="forbidden"))


def chat_blueprint(hub: Hub, settings: Settings, verifier: TokenVerifier | None) -> Blueprint:
    """The ``/chat`` WebSocket route of one app."""
    chat = Blueprint("chat", __name__)
    chat.websocket("/chat")(ChatEndpoint(hub, settings, verifier).handle)
    return chat
