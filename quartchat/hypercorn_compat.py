"""The one place quartchat reaches into hypercorn's internals: lingering ping tasks.

hypercorn (0.17, 0.18) starts a ``WSStream._send_pings`` task per accepted
WebSocket, in the connection's task group. The task loops ``while not
self.closed: ping; sleep(websocket_ping_interval)``, so after the socket
closed it sleeps on for up to one ping interval, and the connection's task
group, hence hypercorn's server task, waits for it. At shutdown hypercorn
waits for every server task up to ``graceful_timeout``: a server whose last
socket closed less than a ping interval before SIGTERM exits only after that
timeout, although nothing is left to serve.

:func:`cancel_ping_tasks` is called by our shutdown trigger once the hub's
drain has closed every socket: it cancels those sleepers (hypercorn's task
group treats a cancelled child as finished, not as an error). If a future
hypercorn renames or removes the method, it finds nothing and logs so once;
``tests/test_hypercorn_compat.py`` pins that it still finds them.
"""

from __future__ import annotations

import asyncio
import logging
from types import CodeType

__all__ = ["cancel_ping_tasks", "ping_task_code"]

log = logging.getLogger(__name__)


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
