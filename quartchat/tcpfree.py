"""A finished TCP connection freed at once, not by the cyclic collector.

hypercorn 0.18's ``TCPServer`` keeps, after its ``run`` has ended, its
``ProtocolWrapper`` (whose ``send`` is the server's own bound
``protocol_send``) and its task group, and both reach back to it. So every
closed connection is a reference cycle: the TCP server with its h11 (and, for
a WebSocket, wsproto) state, the asyncio streams and transport, the task group
and its tasks. It was about 47 collector-tracked objects per closed socket
(`gc.DEBUG_SAVEALL` after 1,000 connect/join/close cycles), freed only by a
full collection: the bigger the collector's thresholds, the longer closed
sockets stayed in memory, which is why ``QUARTCHAT_GC_THRESHOLD`` could not
default to larger ones.

:func:`install` wraps ``TCPServer.run``: when it ends, the server forgets its
protocol and task group, and what is left is freed by reference counting. The
one cycle left per request is werkzeug's route matcher (a closure that
refers to itself, 8 objects), which dies young. If hypercorn's ``TCPServer``
does not look as expected, nothing is patched and :func:`install` returns
False; ``tests/test_hypercorn_config.py`` pins that it still finds it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["install", "installed"]

log = logging.getLogger(__name__)

_MARK = "_quartchat_tcpfree_patch"
_HELD = ("protocol", "_task_group")  # what the finished connection's cycle runs through


def installed() -> bool:
    """True once :func:`install` has patched hypercorn's ``TCPServer``."""
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
    except ImportError:
        return False
    return bool(getattr(TCPServer, _MARK, False))


def install() -> bool:
    """Patch ``TCPServer.run`` (idempotent); False when hypercorn is not as expected."""
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
    except ImportError:
        return False
    if getattr(TCPServer, _MARK, False):
        return True
    run = getattr(TCPServer, "run", None)
    names = getattr(getattr(run, "__code__", None), "co_names", ())
    if not asyncio.iscoroutinefunction(run) or not all(name in names for name in _HELD):
        log.warning(
            "hypercorn's TCPServer is not as expected: closed connections wait in cycles for "
            "the collector (QUARTCHAT_GC_THRESHOLD=default collects them sooner)"
        )
        return False

    async def _run(self: Any) -> None:
        try:
            await run(self)
        finally:
            for name in _HELD:
                self.__dict__.pop(name, None)

    TCPServer.run = _run  # type: ignore[method-assign]
    setattr(TCPServer, _MARK, True)
    return True
