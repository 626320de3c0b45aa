"""Batched frame writes straight to hypercorn's WebSocket stream.

Each ``websocket.send()`` through Quart costs a blinker signal, an ASGI event,
hypercorn's state checks, a wsproto frame and one socket write with its own
drain: about 100 µs of Python per frame, which dominates fan-out. When a
socket has several frames queued, this writes them as WebSocket frames built
by the stream's own wsproto connection, in one socket write.

It reaches into hypercorn's stream (``hypercorn.protocol.ws_stream.WSStream``:
``connection``, ``send``, ``stream_id``, ``closed``, ``state``), so it checks
every one of those and falls back to Quart's ``send`` when anything is not
as expected (another server, another hypercorn version, HTTP/2).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FastSender", "fast_sender_for"]


class FastSender:
    """Writes many text frames to one hypercorn WebSocket stream at once."""

    def __init__(
        self,
        stream: Any,
        message_cls: Any,
        data_cls: Any,
        connected: Any,
        ws_open: Any = None,
        protocol_error: type[Exception] = Exception,
    ) -> None:
        self._stream = stream
        self._message = message_cls
        self._data = data_cls
        self._connected = connected
        self._ws_open = ws_open
        self._protocol_error = protocol_error

    def usable(self) -> bool:
        """The stream is open, and so is its WebSocket: hypercorn's stream stays
        CONNECTED after wsproto has sent a close (LOCAL_CLOSING: its own 1009,
        say), and wsproto refuses any frame then."""
        stream = self._stream
        if stream.closed or stream.state != self._connected:
            return False
        return self._ws_open is None or stream.connection.state == self._ws_open

    async def send_many(self, frames: list[str]) -> bool:
        """Send the frames in order; False (nothing sent) when the stream is not open."""
        stream = self._stream
        if not self.usable():
            return False
        build = stream.connection.send
        message = self._message
        try:
            data = b"".join([build(message(data=frame)) for frame in frames])
        except self._protocol_error:
            return False  # closing after all: nothing was written
        await stream.send(self._data(stream_id=stream.stream_id, data=data))
        return True


def fast_sender_for(ws: Any) -> FastSender | None:
    """A FastSender for a Quart websocket served by hypercorn over HTTP/1.1, else None."""
    try:
        from hypercorn.protocol.events import Data as StreamData
        from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
        from wsproto.connection import ConnectionState
        from wsproto.events import Message
        from wsproto.utilities import LocalProtocolError
    except ImportError:
        return None
    send = getattr(ws, "_send", None)
    args = getattr(send, "args", ())
    app_send = args[0] if args else None
    stream = getattr(app_send, "__self__", None)
    if not isinstance(stream, WSStream):
        return None
    for attr in ("connection", "send", "stream_id", "closed", "state"):
        if not hasattr(stream, attr):
            return None
    return FastSender(
        stream,
        Message,
        StreamData,
        ASGIWebsocketState.CONNECTED,
        ConnectionState.OPEN,
        LocalProtocolError,
    )
