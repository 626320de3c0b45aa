"""WebSocket pings: one task per process instead of hypercorn's one per socket.

With ``websocket_ping_interval`` set (``hypercorn.toml``: 20 s), hypercorn
0.17/0.18 spawns one ``WSStream._send_pings`` task per WebSocket, in the TCP
connection's task group::

    while not self.closed:
        send a ping; await sleep(websocket_ping_interval)

That is a task, its coroutines and a timer for every open socket (2.7 kB of
the 47 kB an idle socket costs, and 12 % of a handshake's CPU), and it looks
at ``closed`` only after each sleep while the connection's task group waits
for it: every closed WebSocket (hypercorn's TCP server, stream, wsproto
connection, buffers, the ASGI scope, Quart's websocket objects) stayed in
memory for up to one ping interval after the client had gone. Under churn that
is ``connects/s x 20 s`` dead connections alive at once; a bare Quart app on
hypercorn with this setting grew from 41 to 124 MB over 3,000 connect/close
cycles (47 MB without pings).

:func:`install` wraps ``WSStream._send_pings``: a stream whose transport is
where hypercorn 0.18's HTTP/1.1 path keeps it is handed to this process's
:class:`Pinger` and the spawned task ends at once. The pinger holds streams
by weak reference, spread over slots by when they were accepted, and each
tick writes a ping frame (built by the stream's own wsproto connection: a
control frame, never compressed) straight to the transports of one slot, with
no await, exactly as :class:`~quartchat.fastsend.DirectWriter` writes
messages; a socket whose write buffer is over its high-water mark is skipped
for that round. Anything else (HTTP/2, another hypercorn) keeps hypercorn's
own loop, and ``handle`` cancels that loop's task once its stream is closed.
If hypercorn's stream does not look as expected, nothing is patched and
:func:`install` returns False.

:func:`cancel_ping_tasks` is the shutdown's safety net: once the hub's drain
has closed every socket, our shutdown trigger cancels any ping task still
sleeping, so hypercorn's wait for its server tasks (``graceful_timeout``)
ends at once. This module, :mod:`quartchat.fastsend`, :mod:`quartchat.tcpfree`
and :mod:`quartchat.leansocket` are where quartchat reaches into hypercorn's internals;
``tests/test_hypercorn_config.py`` pins that they still find what they patch.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from types import CodeType
from typing import Any

from .fastsend import high_water, transport_of

__all__ = ["Pinger", "cancel_ping_tasks", "install", "installed", "ping_task_code", "pinger_for"]

log = logging.getLogger(__name__)

_MARK = "_quartchat_ping_patch"
_TASK = "_quartchat_ping_task"
_PINGER = "_quartchat_pinger"  # (the pinger, the slot) a stream was handed to


def installed() -> bool:
    """True once :func:`install` has patched hypercorn's ``WSStream``."""
    try:
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError:
        return False
    return bool(getattr(WSStream, _MARK, False))


def install() -> bool:
    """Patch ``WSStream`` (idempotent); False when hypercorn is not as expected."""
    try:
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError:
        return False
    if getattr(WSStream, _MARK, False):
        return True
    send_pings = getattr(WSStream, "_send_pings", None)
    handle = getattr(WSStream, "handle", None)
    if not (asyncio.iscoroutinefunction(send_pings) and asyncio.iscoroutinefunction(handle)):
        log.warning("hypercorn's WSStream has no _send_pings/handle: ping task patch not applied")
        return False

    async def _send_pings(self: Any) -> None:
        if pinger_for(self.config.websocket_ping_interval).add(self):
            return  # the process's pinger has it: no task per socket
        task = asyncio.current_task()
        setattr(self, _TASK, task)
        try:
            await send_pings(self)
        finally:
            if getattr(self, _TASK, None) is task:
                setattr(self, _TASK, None)

    async def _handle(self: Any, event: Any) -> None:
        try:
            await handle(self, event)
        finally:
            if getattr(self, "closed", False):
                mark = getattr(self, _PINGER, None)
                if mark is not None:
                    mark[0].discard(self)
                task = getattr(self, _TASK, None)
                if task is not None and task is not asyncio.current_task():
                    setattr(self, _TASK, None)
                    task.cancel()

    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    WSStream.handle = _handle  # type: ignore[method-assign]
    setattr(WSStream, _MARK, True)
    return True


# A process's pings go out in this many rounds per interval (0.2 s apart at 20 s). Sockets
# accepted together must not be pinged together: every client answers with a pong at once,
# and hypercorn parsing a few hundred of them at the same moment stalled a fan-out for
# 50 ms. Streams are dealt to the slots in turn instead.
_SLOTS = 100


class Pinger:
    """Pings every WebSocket stream handed to it once per ``interval``, from one task.

    Streams are held by weak reference in ``slots`` sets; one set is pinged
    per tick (``interval / slots``), and streams are dealt to the sets in
    turn, so a process's pings (and its clients' pongs) are spread evenly over
    the interval, also for sockets accepted in the same instant; a stream's
    first ping comes within one interval of its accept. The task starts with the first
    stream and ends at the first tick that finds none left. It runs in a context of its
    own: it must not keep the first socket's request context alive.
    """

    def __init__(self, interval: float, slots: int = _SLOTS) -> None:
        from hypercorn.protocol.ws_stream import ASGIWebsocketState
        from wsproto.connection import ConnectionState
        from wsproto.events import Ping

        self.interval = interval
        self._slots: list[weakref.WeakSet[Any]] = [weakref.WeakSet() for _ in range(slots)]
        self._at = 0  # the slot pinged last
        self._deal = 0  # the slot the next stream joins
        self._task: asyncio.Task[None] | None = None
        self._connected = ASGIWebsocketState.CONNECTED
        self._open = ConnectionState.OPEN
        self._ping = Ping
        self.sent = 0
        self.skipped = 0

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots)

    def add(self, stream: Any) -> bool:
        """Take ``stream`` over from hypercorn's ping loop; False when it cannot
        (its transport is not where HTTP/1.1 keeps it): the loop goes on."""
        if transport_of(stream) is None or not hasattr(stream, "connection"):
            return False
        self._slots[self._deal].add(stream)
        setattr(stream, _PINGER, (self, self._deal))
        self._deal = (self._deal + 1) % len(self._slots)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="websocket-pings", context=contextvars.Context()
            )
        return True

    def discard(self, stream: Any) -> None:
        """Forget a stream now (it has closed); the task ends at its next tick if it was
        the last. A closed stream is freed by its last reference or, in a cycle, by the
        collector; this one does not wait for either."""
        mark = getattr(stream, _PINGER, None)
        if mark is not None and mark[0] is self:
            self._slots[mark[1]].discard(stream)

    def ping_slot(self) -> None:
        """One tick: ping the streams of the next slot, forget the closed ones."""
        self._at = (self._at + 1) % len(self._slots)
        slot = self._slots[self._at]
        for stream in list(slot):
            if not self._ping_one(stream):
                slot.discard(stream)

    def _ping_one(self, stream: Any) -> bool:
        """Ping one stream; False once it is closed (forget it)."""
        ws = stream.connection
        transport = transport_of(stream)
        if (
            stream.closed
            or stream.state != self._connected
            or ws.state != self._open
            or transport is None
            or transport.is_closing()
        ):
            return False
        if transport.get_write_buffer_size() > high_water(transport):
            self.skipped += 1  # not reading what we send: the outbound queue's bound decides
            return True
        transport.write(ws.send(self._ping()))
        self.sent += 1
        return True

    async def _run(self) -> None:
        tick = self.interval / len(self._slots)
        while len(self):
            await asyncio.sleep(tick)
            self.ping_slot()


_PINGERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Pinger]] = (
    weakref.WeakKeyDictionary()
)


def pinger_for(interval: float) -> Pinger:
    """This event loop's pinger for ``interval`` seconds."""
    pingers = _PINGERS.setdefault(asyncio.get_running_loop(), {})
    pinger = pingers.get(interval)
    if pinger is None:
        pinger = pingers[interval] = Pinger(interval)
    return pinger


def ping_task_code() -> CodeType | None:
    """The code object of hypercorn's per-WebSocket ping loop (None if it has none)."""
    try:
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError:  # pragma: no cover - a hypercorn without this module
        return None
    func = getattr(WSStream, "_send_pings", None)
    code = getattr(func, "__code__", None)
    return code if isinstance(code, CodeType) else None


def cancel_ping_tasks() -> int:
    """Cancel hypercorn's WebSocket ping tasks on this loop; how many were cancelled.

    Only for shutdown, after every socket was closed: a ping task does nothing
    else than ping, so cancelling one of a socket still open only stops its
    pings; the socket's own request task still holds its connection.
    """
    code = ping_task_code()
    if code is None:
        log.warning("hypercorn has no WSStream._send_pings: shutdown may wait graceful_timeout")
        return 0
    cancelled = 0
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        if getattr(coro, "cr_code", None) is code and not task.done():
            task.cancel()
            cancelled += 1
    if cancelled:
        log.debug("shutdown: cancelled %d lingering WebSocket ping tasks", cancelled)
    return cancelled
