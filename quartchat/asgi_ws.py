"""Quart's ASGI WebSocket connection, with no task of its own per socket.

Quart 0.22's ``ASGIWebsocketConnection`` runs every WebSocket in two new
tasks, one moving ASGI events into the websocket's queue (with a signal per
message) and one running the route, and the ASGI task (hypercorn's, per
socket) only waits for the first of them to end. :class:`InlineWebsocketConnection`
(Quart's documented ``asgi_websocket_class`` extension point) runs the route
in the ASGI task, and ``websocket.receive()`` takes the next message straight
from the server's ASGI ``receive``: two tasks, a queue, a wait and their
futures fewer per socket, and no hop per message received.

One thing differs from Quart, and is why this is quartchat's and not a
general replacement: a client that goes away is noticed when the route next
reads (its ``receive()`` raises ``CancelledError``, as Quart would cancel the
route), not at once. quartchat's only WebSocket route reads from its accept
to its end; its cleanup, which does not read, is bounded by its close wait.
The ``websocket_received`` signal is not sent (quartchat connects nothing to it).
The cancellation a disconnect causes ends here; one from outside (hypercorn's
shutdown) goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from quart.asgi import ASGIWebsocketConnection

__all__ = ["InlineWebsocketConnection", "receiver"]


class _Inbound:
    """The websocket's ``receive``: the next message of the ASGI ``receive``."""

    __slots__ = ("_receive", "gone")

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self.gone = False

    async def get(self) -> str | bytes:
        while not self.gone:
            event = await self._receive()
            kind = event["type"]
            if kind == "websocket.receive":
                data: str | bytes = event.get("bytes") or event["text"]
                return data
            if kind == "websocket.disconnect":
                self.gone = True
        raise asyncio.CancelledError  # the client went away: Quart cancels the route


class InlineWebsocketConnection(ASGIWebsocketConnection):
    """One socket's ASGI call: the route in this task, reading the ASGI events itself."""

    def __init__(self, app: Any, scope: Any) -> None:
        # Quart's own __init__, less the asyncio.Queue it makes for its reader task (three
        # deques and an Event, built and dropped per handshake here). The attributes
        # are pinned against Quart's in tests/test_asgi_ws.py.
        self.app = app
        self.scope = scope
        self._accepted = False
        self._closed = False

    async def __call__(self, receive: Any, send: Any) -> None:
        handler = asyncio.current_task()
        inbound = _Inbound(receive)
        self.queue = inbound  # type: ignore[assignment]  # the websocket reads queue.get
        websocket = self._create_websocket_from_scope(send)
        try:
            await self.handle_websocket(websocket, send)
        except asyncio.CancelledError:
            if not inbound.gone or handler is None or handler.cancelling() > 0:
                raise


def receiver(ws: Any) -> Callable[[], Awaitable[str | bytes]]:
    """An accepted websocket's call for its next message: the inline connection's own
    ``get`` when ``ws`` is one of ours, else ``ws.receive``. Quart's ``receive`` first
    calls ``accept`` again for every message (a no-op once accepted, but a new
    ``Headers`` and two coroutines each time, and a coroutine frame more kept per idle
    socket)."""
    own: Any = getattr(ws, "_receive", None)
    if isinstance(getattr(own, "__self__", None), _Inbound):
        return own  # type: ignore[no-any-return]
    return ws.receive  # type: ignore[no-any-return]
