"""An asyncio client for quartchat that follows the reliable client recipe.

What it owns: one WebSocket at a time (the ``websockets`` package), reconnected
with exponential backoff and jitter after any close except 4003; the last seq
seen per room, so every rejoin asks for ``since_seq`` (no gap, no duplicate:
a seq is handed to you once); a random ``client_msg_id`` per post, resent
unchanged until acked, with a pending / sent / failed state; ``rate_limited``
and ``unavailable`` answered by waiting and retrying; auth mode "jwt"
(``?token=``, ``refresh`` before expiry, a fresh token after 4001).

    async with ChatClient("ws://127.0.0.1:8080/chat", sender_id="alice") as chat:
        await chat.join("room101", history=20)
        post = await chat.send("room101", "hello")       # returns once acked (stored)
        async for message in chat.messages():            # every room's messages, in seq order
            print(message["seq"], message["sender_id"], message["content"])

Messages go to ``on_message`` when given, else into a bounded inbox read with
``messages()``/``next_message()``. A full inbox stops the reader (back
pressure): the server may then close the socket with 4008, and the client
reconnects with ``since_seq``, so nothing is lost either way.

This module owns the connection loop and the public API; what each server
frame does is :mod:`.frames`, what is sent and when is :mod:`.sending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..errors import CloseCode
from ..validate import ID_PATTERN, SENDER_ID_PATTERN, valid_room_id, valid_sender_id
from .frames import FrameHandling
from .parts import (
    Pace,
    Post,
    PostFailed,
    Room,
    TokenSource,
    backoff_delay,
    stop_task,
)
from .sending import Sending

__all__ = ["ChatClient"]

log = logging.getLogger(__name__)


class ChatClient(FrameHandling, Sending):
    """A reconnecting quartchat client (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        sender_id: str | None = None,
        token: str | None = None,
        get_token: TokenSource | None = None,
        history: int = 0,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        ack_timeout: float = 5.0,
        retry_initial: float = 0.25,
        refresh_margin: float = 30.0,
        open_timeout: float = 10.0,
        inbox_size: int = 10_000,
        connect_options: dict[str, Any] | None = None,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if (
            token is None
            and get_token is None
            and (sender_id is None or not valid_sender_id(sender_id))
        ):
            raise ValueError(f"sender_id must match {SENDER_ID_PATTERN}, got {sender_id!r}")
        self.url = url
        self.sender_id = sender_id
        self.token = token
        self.get_token = get_token
        self.history_size = history
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.ack_timeout, self.retry_initial = ack_timeout, retry_initial
        self.refresh_margin, self.open_timeout = refresh_margin, open_timeout
        self.on_message = on_message
        # Passed to websockets.connect: origin, additional_headers, ssl...
        self.connect_options = dict(connect_options or {})
        self.state = "idle"  # idle | connecting | open | waiting | closed
        self.welcome: dict[str, Any] | None = None
        self.reconnects = 0
        self.close_codes: list[int | None] = []
        self.errors: list[dict[str, Any]] = []  # error frames and refused handshakes, newest last
        self._rooms: dict[str, Room] = {}
        self._posts: dict[str, Post] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(inbox_size)
        self._ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # anything changed: wakes wait_for()
        self._wake = asyncio.Event()  # something may be due: wakes the sender
        self._history: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._stopping = False
        self._pace = Pace(0.0, 0.0)

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> Self:
        """Start the connection task and wait for the first welcome."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"quartchat-client:{self.sender_id}")
        await self.wait_for(lambda: self.state == "open", timeout=self.open_timeout)
        return self

    async def close(self) -> None:
        """Stop for good: close the socket, end the task. Pending posts stay pending."""
        self._stopping = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._ws.close()
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        self.state = "closed"
        self._pulse()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- API ------------------------------------------------------------------

    async def join(
        self, room_id: str, *, history: int | None = None, timeout: float = 10.0
    ) -> None:
        """Join a room (now and after every reconnect); returns once joined."""
        if not valid_room_id(room_id):
            raise ValueError(f"room_id must match {ID_PATTERN}, got {room_id!r}")
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = Room(
                room_id, self.history_size if history is None else history
            )
        if self.state == "open" and not room.joined:
            await self._send_join(room)
        await self.wait_for(lambda: room.joined or room_id not in self._rooms, timeout=timeout)
        if room_id not in self._rooms:
            raise PostFailed(*self._last_error_for(room_id))

    async def leave(self, room_id: str) -> None:
        """Leave a room; its pending posts fail."""
        room = self._rooms.pop(room_id, None)
        if room is not None and room.joined:
            await self._send({"action": "leave", "room_id": room_id})
        for post in [p for p in self._posts.values() if p.room_id == room_id]:
            self._fail(post, "left", "left the room")

    def post(self, room_id: str, content: str, client_msg_id: str | None = None) -> Post:
        """Queue a post (sent now if joined, else after the next join); returns its Post."""
        if room_id not in self._rooms:
            raise ValueError(f"join {room_id} before posting to it")
        if not content:
            raise ValueError("content must not be empty")
        post = Post(room_id, content, client_msg_id or str(uuid.uuid4()))
        self._posts[post.client_msg_id] = post
        self._pulse()  # the sender loop sends it
        return post

    async def send(self, room_id: str, content: str, *, timeout: float | None = 30.0) -> Post:
        """Post and wait until it is acked (stored); raises PostFailed or TimeoutError."""
        return await self.post(room_id, content).wait(timeout)

    async def history(
        self, room_id: str, before_seq: int | None = None, limit: int = 50, timeout: float = 10.0
    ) -> dict[str, Any]:
        """One page of a room's stored messages (the ``history`` frame)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._history.setdefault(room_id, []).append(fut)
        frame: dict[str, Any] = {"action": "history", "room_id": room_id, "limit": limit}
        if before_seq is not None:
            frame["before_seq"] = before_seq
        if not await self._send(frame):
            self._history[room_id].remove(fut)
            raise ConnectionError("not connected")
        async with asyncio.timeout(timeout):
            return await fut

    def last_seq(self, room_id: str) -> int | None:
        """The last seq seen in a room."""
        room = self._rooms.get(room_id)
        return (
            None
            if room is None
            else (room.last_seq if room.last_seq is not None else room.baseline)
        )

    def members(self, room_id: str) -> set[str]:
        """Who is in a room, from ``joined`` and ``presence``."""
        room = self._rooms.get(room_id)
        return set(room.members) if room else set()

    @property
    def pending(self) -> list[Post]:
        """Posts not acked yet."""
        return list(self._posts.values())

    async def next_message(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message frame from the inbox."""
        async with asyncio.timeout(timeout):
            return await self._inbox.get()

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Every message frame, each seq once, in order per room."""
        while True:
            yield await self._inbox.get()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = 10.0) -> None:
        """Wait (with a deadline) until ``predicate()`` holds; it is checked on every change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                if self._task is not None and self._task.done() and not predicate():
                    self._task.result()  # raise what killed it
                    raise ConnectionError(f"client stopped ({self.state})")
                await self._changed.wait()

    # ---- the connection loop ------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            self.state = "connecting"
            self._pulse()
            code: int | None = None
            welcomed = False
            try:
                url = await self._connect_url()
                options = {
                    "open_timeout": self.open_timeout,
                    "ping_interval": 20,
                    "compression": None,
                    "max_size": 2**20,
                    **self.connect_options,
                }
                async with websockets.connect(url, **options) as ws:
                    self._ws = ws
                    welcomed = await self._session(ws)
                code = ws.close_code
            except InvalidStatus as exc:
                self._refused(exc)
            except (OSError, TimeoutError, ConnectionClosed, websockets.InvalidHandshake) as exc:
                code = getattr(self._ws, "close_code", None) if self._ws is not None else None
                log.debug("quartchat client: connection failed: %r", exc)
            finally:
                self._ws = None
                self._lost()
            if self._stopping:
                break
            self.close_codes.append(code)
            if code == CloseCode.DISCONNECTED:  # 4003: do not reconnect
                self.state = "closed"
                self._pulse()
                return
            if welcomed:
                attempt = 0
            delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max)
            attempt += 1
            self.reconnects += 1
            self.state = "waiting"
            self._pulse()
            await asyncio.sleep(delay)

    async def _connect_url(self) -> str:
        if self.get_token is not None:
            self.token = await self.get_token()
        query = {"token": self.token} if self.token is not None else {"sender_id": self.sender_id}
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _refused(self, exc: InvalidStatus) -> None:
        status = exc.response.status_code
        try:
            body = json.loads(exc.response.body or b"{}")
        except ValueError:
            body = {}
        error = {
            "type": "error",
            "code": body.get("error", "handshake_refused"),
            "message": body.get("message", f"HTTP {status}"),
            "status": status,
        }
        self.errors.append(error)
        log.warning("quartchat client: handshake refused (%s %s)", status, error["code"])

    async def _session(self, ws: Any) -> bool:
        """Read frames until the socket closes; a sender task resends what is due."""
        sender: asyncio.Task[None] | None = None
        refresher: asyncio.Task[None] | None = None
        welcomed = False
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "welcome":
                    welcomed = True
                    self._on_welcome(frame)
                    for room in self._rooms.values():
                        await self._send_join(room)
                    sender = asyncio.create_task(self._sender(), name="quartchat-client:sender")
                    if frame.get("expires_at") and self.get_token is not None:
                        refresher = asyncio.create_task(self._refresher(frame["expires_at"]))
                elif frame.get("type") == "refreshed" and self.get_token is not None:
                    if refresher is not None:
                        refresher.cancel()
                    refresher = asyncio.create_task(self._refresher(frame["expires_at"]))
                else:
                    await self._on_frame(frame)
                self._pulse()
        except ConnectionClosed:
            pass
        finally:
            for task in (sender, refresher):
                if task is not None:
                    await stop_task(task)
        return welcomed

    def _on_welcome(self, frame: dict[str, Any]) -> None:
        self.welcome = frame
        self.sender_id = frame["sender_id"]
        self.state = "open"
        rate = float((frame.get("limits") or {}).get("rate_per_s") or 0)
        self._pace = Pace(rate, asyncio.get_running_loop().time())

    def _lost(self) -> None:
        self.welcome = None
        for room in self._rooms.values():
            room.joined = False
        for post in self._posts.values():
            post.sent_at = None
        for futures in self._history.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(ConnectionError("disconnected"))
        self._history.clear()
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._wake.set()
