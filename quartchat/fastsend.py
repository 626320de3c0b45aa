"""Batched frame writes straight to hypercorn's WebSocket stream.

Each ``websocket.send()`` through Quart costs a blinker signal, an ASGI event,
hypercorn's state checks, a wsproto frame and one socket write with its own
drain: about 100 µs of Python per frame, which dominates fan-out. When a
socket has several frames queued, this writes them as WebSocket frames built
by the stream's own wsproto connection, in one socket write.

Server-to-client frames are not masked, so without an extension a text
frame's bytes depend on its payload only: :func:`prepare` builds them once per
room message, and a :class:`DirectWriter` puts them on the socket's transport
with no await and no task wake-up (``transport.write`` is synchronous, so bytes
never interleave with hypercorn's own writes). The transport's write buffer is
then the bound: over its high-water mark the direct path declines, and the
caller queues for the writer task, whose sends wait for the drain.

It reaches into hypercorn's stream (``hypercorn.protocol.ws_stream.WSStream``:
``connection``, ``send``, ``stream_id``, ``closed``, ``state``; and through
``send`` the HTTP/1.1 protocol and TCP server that own the transport), so it
checks every one of those and falls back to Quart's ``send`` when anything is
not as expected (another server, another hypercorn version, HTTP/2, a
negotiated permessage-deflate).
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = [
    "DirectWriter",
    "FastSender",
    "decline_compression",
    "fast_sender_for",
    "high_water",
    "prepare",
    "transport_of",
]

_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


def prepare(frame: str) -> bytes:
    """The bytes of an unmasked, unfragmented, uncompressed text frame (RFC 6455 5.2)."""
    payload = frame.encode()
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _LEN16.pack(0x81, 126, n) + payload
    return _LEN64.pack(0x81, 127, n) + payload


def high_water(transport: Any) -> int:
    """A transport's write-buffer high-water mark (asyncio's default where it has none)."""
    try:
        return int(transport.get_write_buffer_limits()[1])
    except (AttributeError, NotImplementedError, TypeError):
        return 64 * 1024


class DirectWriter:
    """Writes prepared frames to one socket's transport, or declines (False).

    It declines when the stream or its WebSocket is not open, when the
    transport is closing, and when the transport already buffers more than its
    high-water mark (a reader that is not keeping up: the caller's queue and
    its 4008 bound take over). It never awaits.
    """

    __slots__ = ("_connected", "_limit", "_stream", "_transport", "_ws", "_ws_open")

    def __init__(self, stream: Any, transport: Any, connected: Any, ws_open: Any) -> None:
        self._stream = stream
        self._ws = stream.connection
        self._transport = transport
        self._connected = connected
        self._ws_open = ws_open
        self._limit = high_water(transport)

    def write(self, wire: bytes) -> bool:
        stream = self._stream
        transport = self._transport
        if (
            stream.closed
            or stream.state != self._connected
            or self._ws.state != self._ws_open
            or transport.is_closing()
            or transport.get_write_buffer_size() > self._limit
        ):
            return False
        transport.write(wire)
        return True


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

    def direct(self) -> DirectWriter | None:
        """A DirectWriter for this stream, or None when its frames are not plain
        (an extension such as permessage-deflate was negotiated) or the
        transport cannot be found where hypercorn 0.18's HTTP/1.1 path keeps it."""
        stream = self._stream
        if self._ws_open is None or getattr(stream.connection, "_proto", None) is None:
            return None
        if getattr(stream.connection._proto, "extensions", None) != []:
            return None
        transport = transport_of(stream)
        if transport is None:
            return None
        return DirectWriter(stream, transport, self._connected, self._ws_open)

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


def transport_of(stream: Any) -> Any | None:
    """The asyncio transport under a WSStream served over HTTP/1.1 by hypercorn:
    ``stream.send`` is ``H11Protocol.stream_send``, whose ``send`` is
    ``TCPServer.protocol_send``, whose ``writer`` is the connection's StreamWriter."""
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.protocol.h11 import H11Protocol
    except ImportError:
        return None
    h11 = getattr(getattr(stream, "send", None), "__self__", None)
    if not isinstance(h11, H11Protocol):
        return None
    server = getattr(h11.send, "__self__", None)
    if not isinstance(server, TCPServer):
        return None
    transport = getattr(getattr(server, "writer", None), "transport", None)
    needed = ("write", "is_closing", "get_write_buffer_size")
    if transport is None or not all(hasattr(transport, name) for name in needed):
        return None
    return transport


def _stream_of(ws: Any) -> Any | None:
    """The hypercorn WSStream behind a Quart websocket, or None."""
    try:
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError:
        return None
    send = getattr(ws, "_send", None)
    args = getattr(send, "args", ())
    app_send = args[0] if args else None
    stream = getattr(app_send, "__self__", None)
    return stream if isinstance(stream, WSStream) else None


def decline_compression(ws: Any) -> bool:
    """Make the coming ``accept()`` refuse every extension the client offered
    (browsers always offer permessage-deflate, and hypercorn always accepts it,
    compressing every frame per socket). True when it could; call before accept."""
    stream = _stream_of(ws)
    handshake = getattr(stream, "handshake", None)
    if (
        handshake is None
        or getattr(handshake, "accepted", True)
        or not hasattr(handshake, "extensions")
    ):
        return False
    handshake.extensions = None
    return True


def fast_sender_for(ws: Any) -> FastSender | None:
    """A FastSender for a Quart websocket served by hypercorn over HTTP/1.1, else None."""
    try:
        from hypercorn.protocol.events import Data as StreamData
        from hypercorn.protocol.ws_stream import ASGIWebsocketState
        from wsproto.connection import ConnectionState
        from wsproto.events import Message
        from wsproto.utilities import LocalProtocolError
    except ImportError:
        return None
    stream = _stream_of(ws)
    if stream is None:
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
