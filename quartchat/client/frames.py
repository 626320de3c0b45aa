"""What the asyncio client does with each frame the server sends: messages
handed out once by seq, acks and errors settling posts, joined / presence /
left keeping each room's state, history answers. Mixed into
:class:`quartchat.client.core.ChatClient`, which owns the socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .parts import Pace, Post, PostFailed, Room, backoff_delay

__all__ = ["FrameHandling"]

_RETRYABLE = frozenset({"rate_limited", "unavailable"})


class FrameHandling:
    """The client's state that frames change, and the handlers that change it."""

    sender_id: str | None
    on_message: Callable[[dict[str, Any]], None] | None
    retry_initial: float
    errors: list[dict[str, Any]]
    _rooms: dict[str, Room]
    _posts: dict[str, Post]
    _inbox: asyncio.Queue[dict[str, Any]]
    _history: dict[str, list[asyncio.Future[dict[str, Any]]]]
    _pace: Pace

    async def _on_frame(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        if kind == "message":
            room = self._rooms.get(f["room_id"])
            if room is None or (room.last_seq is not None and f["seq"] <= room.last_seq):
                return  # left, or already handed out: never twice
            room.last_seq = f["seq"]
            if f.get("client_msg_id") is not None and f["sender_id"] == self.sender_id:
                post = self._posts.get(f["client_msg_id"])
                if post is not None:
                    self._sent(post, f["seq"], f["id"])
            if self.on_message is not None:
                self.on_message(f)
            else:
                await self._inbox.put(f)
        elif kind == "ack":
            post = self._posts.get(f["client_msg_id"]) if f.get("client_msg_id") else None
            if post is not None:
                self._sent(post, f["seq"], f["id"])
        elif kind == "joined":
            room = self._rooms.get(f["room_id"])
            if room is not None:
                room.joined = True
                room.members = set(f["members"])
                if room.last_seq is None and room.baseline is None:
                    room.baseline = max(0, f["last_seq"] - room.history)
        elif kind == "presence":
            room = self._rooms.get(f["room_id"])
            if room is not None:
                (room.members.add if f["event"] == "join" else room.members.discard)(f["sender_id"])
        elif kind == "left":
            if f.get("reason"):  # kicked or no longer allowed: not rejoined
                self._rooms.pop(f["room_id"], None)
                for post in [p for p in self._posts.values() if p.room_id == f["room_id"]]:
                    self._fail(post, str(f["reason"]), "left the room")
        elif kind == "history":
            futures = self._history.get(f["room_id"])
            if futures:
                fut = futures.pop(0)
                if not fut.done():
                    fut.set_result(f)
        elif kind == "error":
            self._on_error(f)

    def _on_error(self, f: dict[str, Any]) -> None:
        self.errors.append(f)
        post = self._posts.get(f["client_msg_id"]) if f.get("client_msg_id") else None
        loop = asyncio.get_running_loop()
        if post is not None:
            if f["code"] in _RETRYABLE:
                delay = backoff_delay(post.attempts, self.retry_initial, 10.0)
                post.retry_at = loop.time() + delay
                if f["code"] == "rate_limited":
                    self._pace.hold(
                        loop.time() + delay
                    )  # the limit is per connection: everything waits
            elif f["code"] == "not_joined" and post.room_id in self._rooms:
                post.sent_at = None
                room = self._rooms[post.room_id]
                room.joined, room.join_at = False, loop.time()  # the sender rejoins, then resends
            else:
                self._fail(post, f["code"], f.get("message", ""))
        elif f.get("action") == "join" and f.get("room_id") in self._rooms:
            if f["code"] in _RETRYABLE:
                self._rooms[f["room_id"]].join_at = loop.time() + backoff_delay(
                    1, self.retry_initial, 10.0
                )
            else:
                self._rooms.pop(f["room_id"])
        elif f.get("action") == "history" and self._history.get(f.get("room_id", "")):
            fut = self._history[f["room_id"]].pop(0)
            if not fut.done():
                fut.set_exception(PostFailed(f["code"], f.get("message", "")))

    def _last_error_for(self, room_id: str) -> tuple[str, str]:
        for e in reversed(self.errors):
            if e.get("room_id") == room_id:
                return e["code"], e.get("message", "")
        return "left", "not joined"

    def _sent(self, post: Post, seq: int, id_: str) -> None:
        self._posts.pop(post.client_msg_id, None)
        if post.state != "sent":
            post.state, post.seq, post.id = "sent", seq, id_
            post._done.set()

    def _fail(self, post: Post, code: str, message: str) -> None:
        self._posts.pop(post.client_msg_id, None)
        post.state, post.error = "failed", PostFailed(code, message)
        post._done.set()
