"""Cross-server moderation: the ``@control`` broker channel and what it does to local sockets.

A server-API call (disconnect a user, kick a user from a room) is published
once on the broker's ``@control`` channel; every process, the caller's
included, subscribes once and applies it to its own connections. Room ids
can never contain ``@``, so the channel never clashes with a room. Because it
goes through the broker it works with ``memory://`` and ``redis://`` alike.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from .broker import BrokerError
from .errors import ChatError, CloseCode
from .hub import Hub
from .protocol import valid_room_id, valid_sender_id
from .room import Leave

__all__ = ["CONTROL_CHANNEL", "Control"]

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "@control"


class Control:
    """This process's subscription to ``@control`` (started and stopped with the app)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._subscribed = False

    async def start(self) -> None:
        await self.hub.broker.subscribe(CONTROL_CHANNEL, self._on_payload)
        self._subscribed = True

    async def stop(self) -> None:
        if not self._subscribed:
            return
        self._subscribed = False
        try:
            await self.hub.broker.unsubscribe(CONTROL_CHANNEL, self._on_payload)
        except BrokerError as exc:
            log.warning("control unsubscribe failed: %s", exc)

    # ---- sending ----------------------------------------------------------

    async def disconnect(self, sender_id: str) -> None:
        """Close every connection of ``sender_id``, on every server, with 4003."""
        await self._publish({"op": "disconnect", "sender_id": sender_id})

    async def kick(self, room_id: str, sender_id: str) -> None:
        """Make every connection of ``sender_id``, on every server, leave ``room_id``."""
        await self._publish({"op": "kick", "room_id": room_id, "sender_id": sender_id})

    async def _publish(self, message: dict[str, str]) -> None:
        try:
            await self.hub.broker.publish(CONTROL_CHANNEL, orjson.dumps(message))
        except BrokerError as exc:
            raise ChatError("unavailable", "broker unavailable; retry later") from exc

    # ---- receiving ----------------------------------------------------------

    def _on_payload(self, payload: bytes | None) -> None:
        """Broker handler: never blocks. None (a reconnect) needs nothing here."""
        if payload is None:
            return
        try:
            message: Any = orjson.loads(payload)
            op, sender = message["op"], message["sender_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed control message")
            return
        if not valid_sender_id(sender):
            return
        if op == "disconnect":
            self.disconnect_local(sender)
        elif op == "kick" and valid_room_id(message.get("room_id")):
            self.leave_local(message["room_id"], sender, "kicked")

    def disconnect_local(self, sender_id: str) -> int:
        """Close this process's connections of ``sender_id`` with 4003; returns how many."""
        closed = 0
        for conn in list(self.hub.connections):
            if conn.sender_id == sender_id and conn.open:
                conn.close(CloseCode.DISCONNECTED, "disconnected by the application")
                closed += 1
        if closed:
            log.info("disconnected by the server API", extra={"sender_id": sender_id})
        return closed

    def leave_local(self, room_id: str, sender_id: str, reason: str) -> int:
        """Make this process's connections of ``sender_id`` leave the room (``left`` with
        ``reason``); returns how many."""
        count = 0
        for conn in list(self.hub.connections):
            if conn.sender_id == sender_id and room_id in conn.rooms:
                conn.rooms.discard(room_id)  # the route's set: later frames see it at once
                self.hub.submit(room_id, Leave(conn, reason=reason))
                count += 1
        if count:
            log.info("left a room (%s)", reason, extra={"sender_id": sender_id, "room_id": room_id})
        return count
