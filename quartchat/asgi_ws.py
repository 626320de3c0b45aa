"""Quart's ASGI WebSocket connection, with the handler in the ASGI task itself.

Quart 0.22's ``ASGIWebsocketConnection`` runs every WebSocket in two new
tasks, one reading ASGI events into the websocket's queue and one running the
route, and the ASGI task (hypercorn's, per socket) only waits for the first of
them to end. :class:`InlineWebsocketConnection` (Quart's documented
``asgi_websocket_class`` extension point) runs the route in the ASGI task and
keeps only the reader task: one task, a wait and its futures fewer per socket.

What Quart does is kept: when the client goes away (the reader sees
``websocket.disconnect``) the route is cancelled and the ASGI call returns; an
exception of the reader is raised; the route's own end cancels the reader.
The route sees the cancellation as it would in Quart's handler task; the
cancellation we caused ends here, and one from outside (hypercorn's shutdown)
goes on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from quart.asgi import ASGIWebsocketConnection

__all__ = ["InlineWebsocketConnection"]


class InlineWebsocketConnection(ASGIWebsocketConnection):
    """One socket's ASGI call: the route in this task, Quart's reader in one task."""

    async def __call__(self, receive: Any, send: Any) -> None:
        handler = asyncio.current_task()
        if handler is None:  # pragma: no cover - ASGI apps always run in a task
            await super().__call__(receive, send)
            return
        websocket = self._create_websocket_from_scope(send)
        reader = asyncio.ensure_future(self.handle_messages(receive))
        ended = False  # the reader's end cancelled the route
        route_done = False

        def reader_done(_: asyncio.Future[None]) -> None:
            # Also called after remove_done_callback when the reader ended in the
            # same loop turn as the route (its callbacks were scheduled already).
            nonlocal ended
            if not route_done and not handler.done():
                ended = True
                handler.cancel()

        reader.add_done_callback(reader_done)
        try:
            await self.handle_websocket(websocket, send)
        except asyncio.CancelledError:
            if not ended or handler.uncancel() > 0:
                raise
        finally:
            route_done = True
            reader.remove_done_callback(reader_done)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
