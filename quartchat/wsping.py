"""Stop hypercorn's WebSocket ping task as soon as its stream closes.

With ``websocket_ping_interval`` set (``hypercorn.toml``: 20 s), hypercorn
0.17/0.18 runs one ``WSStream._send_pings`` task per WebSocket, in the TCP
connection's task group::

    while not self.closed:
        send a ping; await sleep(websocket_ping_interval)

It looks at ``closed`` only after each sleep, and the connection's task group
waits for it, so every closed WebSocket (hypercorn's TCP server, stream,
wsproto connection, buffers, the ASGI scope, Quart's websocket objects) stays
in memory for up to one ping interval after the client has gone. Under
connection churn that is ``connects/s x 20 s`` dead connections alive at
once, tens of KB each; a bare Quart app on hypercorn with this setting grew
from 41 to 124 MB over 3,000 connect/close cycles (47 MB without pings), and
the allocator keeps that high-water mark after they are freed.

:func:`install` wraps two methods of ``WSStream``: the ping task records
itself on its stream, and ``handle`` cancels it once the stream is closed
(a cancelled child is not an error for the task group). Pings of open sockets
are unchanged. If hypercorn's stream does not look as expected (another
version), nothing is patched and :func:`install` returns False.

:func:`cancel_ping_tasks` is the shutdown's safety net: once the hub's drain
has closed every socket, our shutdown trigger cancels any ping task still
sleeping, so hypercorn's wait for its server tasks (``graceful_timeout``)
ends at once. This module is the one place quartchat reaches into
hypercorn's internals; ``tests/test_hypercorn_config.py`` pins that it still
finds what it patches.
"""

from __future__ import annotations

import asyncio
import logging
from types import CodeType
from typing import Any

__all__ = ["cancel_ping_tasks", "install", "installed", "ping_task_code"]

log = logging.getLogger(__name__)

_MARK = "_quartchat_ping_patch"
_TASK = "_quartchat_ping_task"


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
                task = getattr(self, _TASK, None)
                if task is not None and task is not asyncio.current_task():
                    setattr(self, _TASK, None)
                    task.cancel()

    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    WSStream.handle = _handle  # type: ignore[method-assign]
    setattr(WSStream, _MARK, True)
    return True


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
