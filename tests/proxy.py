"""A TCP proxy the tests control, to cut a client off from a server (MariaDB, Redis).

``TcpProxy`` runs in the caller's event loop (async tests); ``ThreadedProxy``
runs one in its own loop in a background thread, for tests whose clients are
other processes (e.g. `quartchat serve` subprocesses) or synchronous code.

- ``cut()``: reset (RST) every connection through the proxy and reset every new
  one at once, until ``restore()``. The client sees what it would see if the
  server host rebooted: "connection reset", then "connection refused"-like
  failures.
- ``stall()``: keep every connection open but stop forwarding bytes in both
  directions, and accept new connections without ever connecting them upstream,
  until ``restore()``. The client sees a silent network partition: its reads
  hang until its own timeouts fire.
- ``restore()``: forward normally again (new connections; connections that were
  only stalled resume).
- ``close()``: stop listening, close every connection, cancel and await every
  task. After it nothing the proxy started is left running.

Bounded: at most ``max_connections`` connections at once (more are reset),
reads of at most ``chunk`` bytes, writes wait for the peer to drain, upstream
connects time out after ``connect_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

__all__ = ["TcpProxy", "ThreadedProxy"]

T = TypeVar("T")


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a stream with an RST (SO_LINGER 0), not a graceful FIN, without waiting."""
    if writer is None:
        return
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target_host:target_port``, with cut/stall switches."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        max_connections: int = 256,
        chunk: int = 64 * 1024,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.max_connections = max_connections
        self.chunk = chunk
        self.connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._port: int | None = None  # kept after close(), for "is it really closed" checks
        self._handlers: set[asyncio.Task[None]] = set()  # one per accepted connection
        self._writers: set[asyncio.StreamWriter] = set()  # both ends of every live link
        self._cut = False
        self._flowing = asyncio.Event()  # cleared while stalled
        self._flowing.set()
        self._closed = False
        self.accepted = 0  # connections accepted and forwarded (for assertions)
        self.refused = 0  # connections reset because cut, full or closing

    # -- public -------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._port is not None, "proxy not started"
        return self._port

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def connections(self) -> int:
        return len(self._handlers)

    @property
    def is_cut(self) -> bool:
        return self._cut

    async def start(self) -> Self:
        assert self._server is None and not self._closed, "start() once"
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self._listen_port, backlog=self.max_connections
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def cut(self) -> None:
        """Reset every current connection; reset new ones until :meth:`restore`."""
        self._cut = True
        self._flowing.set()  # a stalled handler must see the cut, not wait forever
        await self._reset_all()

    async def stall(self) -> None:
        """Stop forwarding (connections stay open, bytes are held) until :meth:`restore`."""
        self._flowing.clear()
        await asyncio.sleep(0)

    async def restore(self) -> None:
        self._cut = False
        self._flowing.set()
        await asyncio.sleep(0)

    async def close(self) -> None:
        """Stop listening, reset every connection, cancel and await every task."""
        if self._closed:
            return
        self._closed = True
        self._cut = True
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        if self._server is not None:
            # Server.wait_closed() can wait for handler tasks (3.12+); they are gone now.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            # Handlers only run finally blocks once cancelled: this cannot take long.
            async with asyncio.timeout(5):
                await asyncio.gather(*handlers, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut or self._closed or len(self._handlers) >= self.max_connections:
            self.refused += 1
            _reset(client_w)
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()  # stalled: accepted but never connected upstream
            if self._cut:
                self.refused += 1
                return
            async with asyncio.timeout(self.connect_timeout):
                upstream_r, upstream_w = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            self._writers.add(upstream_w)
            if self._cut:
                self.refused += 1
                return
            self.accepted += 1
            pumps = [
                asyncio.create_task(self._pump(client_r, upstream_w)),
                asyncio.create_task(self._pump(upstream_r, client_w)),
            ]
            try:
                # Either direction ending (EOF, error) ends the link.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, TimeoutError):
            pass  # upstream unreachable or a side reset: the link just ends
        except asyncio.CancelledError:
            pass  # cut() or close(): only they cancel handlers, and they await them
        finally:
            self._handlers.discard(task)
            self._writers.discard(client_w)
            _reset(client_w)
            if upstream_w is not None:
                self._writers.discard(upstream_w)
                _reset(upstream_w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(self.chunk)
                if not data:
                    return
                await self._flowing.wait()
                if self._cut:
                    return
                writer.write(data)
                await writer.drain()


class ThreadedProxy:
    """A :class:`TcpProxy` in its own event loop on a daemon thread; blocking methods."""

    def __init__(
        self, target_host: str, target_port: int, *, timeout: float = 10.0, **kwargs: Any
    ) -> None:
        self.timeout = timeout
        self._kwargs = kwargs
        self._target = (target_host, target_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.proxy: TcpProxy | None = None
        self.thread_name = f"test-proxy-{id(self):x}"

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.proxy.port

    @property
    def host(self) -> str:
        assert self.proxy is not None
        return self.proxy.host

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "proxy not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    def start(self) -> Self:
        assert self._thread is None, "start() once"
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()

        async def make() -> TcpProxy:
            return await TcpProxy(*self._target, **self._kwargs).start()

        try:
            self.proxy = self._call(make())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def cut(self) -> None:
        assert self.proxy is not None
        self._call(self.proxy.cut())

    def stall(self) -> None:
        assert self.proxy is not None
        self._call(self.proxy.stall())

    def restore(self) -> None:
        assert self.proxy is not None
        self._call(self.proxy.restore())

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            if self.proxy is not None:
                self._call(self.proxy.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(self.timeout)
        if not loop.is_running():
            loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
