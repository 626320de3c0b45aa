"""What the asyncio client sends: joins with the right position, posts (new,
unacked past ``ack_timeout``, refused and due for a retry) paced to the
server's rate, and in auth mode jwt the ``refresh`` before the token expires.
Mixed into :class:`quartchat.client.core.ChatClient`, which owns the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import datetime
from typing import Any

from websockets.exceptions import ConnectionClosed

from .parts import Pace, Post, Room, TokenSource

__all__ = ["Sending"]

log = logging.getLogger(__name__)


class Sending:
    """The client's outgoing side: one frame at a time over the current socket."""

    ack_timeout: float
    refresh_margin: float
    token: str | None
    get_token: TokenSource | None
    welcome: dict[str, Any] | None
    _ws: Any
    _rooms: dict[str, Room]
    _posts: dict[str, Post]
    _wake: asyncio.Event
    _pace: Pace

    async def _send(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or self.welcome is None:
            return False
        try:
            await ws.send(json.dumps(frame))
            return True
        except ConnectionClosed:
            return False

    async def _send_join(self, room: Room) -> None:
        since = room.last_seq if room.last_seq is not None else room.baseline
        frame: dict[str, Any] = {"action": "join", "room_id": room.room_id}
        if since is not None:
            frame["since_seq"] = since
        else:
            frame["history"] = room.history
        room.since_sent = since
        await self._send(frame)

    async def _sender(self) -> None:
        """Send new posts, resend unacked ones after ``ack_timeout``, retry refused ones."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = loop.time()
            next_due = now + 0.5
            for room in list(self._rooms.values()):
                if not room.joined and room.join_at is not None and room.join_at <= now:
                    room.join_at = None
                    await self._send_join(room)
            for post in list(self._posts.values()):
                target = self._rooms.get(post.room_id)
                if target is None or not target.joined:
                    continue
                due = (
                    post.retry_at
                    if post.retry_at is not None
                    else post.sent_at + self.ack_timeout
                    if post.sent_at is not None
                    else now
                )
                if due > now:
                    next_due = min(next_due, due)
                elif not self._pace.take(now):
                    next_due = min(next_due, self._pace.next_at(now))
                    break  # keep the posts' order: nothing overtakes a post that must wait
                elif await self._send(
                    {
                        "action": "message",
                        "room_id": post.room_id,
                        "content": post.content,
                        "client_msg_id": post.client_msg_id,
                    }
                ):
                    post.attempts += 1
                    post.sent_at, post.retry_at = loop.time(), None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
            # cancel that lands as the wait completes, and this loop never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_due - loop.time())):
                    await self._wake.wait()

    async def _refresher(self, expires_at: str) -> None:
        assert self.get_token is not None
        left = datetime.fromisoformat(expires_at).timestamp() - time.time()
        await asyncio.sleep(
            max(0.0, left - self.refresh_margin if left > 2 * self.refresh_margin else left / 2)
        )
        while True:
            try:
                self.token = await self.get_token()
                await self._send({"action": "refresh", "token": self.token})
                return
            except Exception as exc:  # noqa: BLE001 - any failure of the app's token source: retry until 4001
                log.warning("quartchat client: could not get a token: %r", exc)
                await asyncio.sleep(5)
