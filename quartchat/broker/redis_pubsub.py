"""What the Redis broker's listener does with a redis-py ``PubSub`` beyond its public API.

Two things, each reaching into redis-py's private parts (checked against the
pinned redis-py 8 with hiredis; each falls back to doing nothing special when
they are missing):

- :func:`drain`: handle the complete replies its hiredis reader already holds,
  without a ``get_message`` each (that costs about 40 us of CPU per payload
  here: its retry wrapper, a timeout, the dict it builds; this about a tenth);
- :func:`abort`: close its connection at once, which redis-py does not offer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio.client import PubSub

__all__ = ["abort", "drain"]

try:  # what redis-py's hiredis reader returns while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py: the listener reads through get_message only
    _NOT_ENOUGH_DATA = None


async def drain(ps: PubSub, on_message: Callable[[dict[str, Any]], None]) -> bool:
    """Give ``on_message`` every complete reply already read from ``ps``'s socket, in
    order; -> whether there was any. Only what is buffered (one socket read's worth
    at most): a drain that waited for the rest of a partial reply would read on for
    as long as payloads kept coming, past the listener's timeout. A payload is what
    ``get_message`` would have made of it; anything else (confirmations, pongs) goes
    through redis-py's ``handle_message``, and an error reply raises as it would
    there. Without hiredis there is nothing to drain."""
    reader = getattr(getattr(ps.connection, "_parser", None), "_reader", None)
    gets = getattr(reader, "gets", None)
    if gets is None or _NOT_ENOUGH_DATA is None:
        return False
    drained = False
    while (response := gets()) is not _NOT_ENOUGH_DATA:
        drained = True
        if type(response) is list and len(response) == 3 and response[0] == b"message":
            on_message({"type": "message", "channel": response[1], "data": response[2]})
            continue
        if isinstance(response, Exception):
            raise response
        if type(response) is list and response and isinstance(response[0], Exception):
            raise response[0]
        message = await ps.handle_message(response)  # type: ignore[no-untyped-call]
        if message is not None:
            on_message(message)
    return drained


def abort(ps: PubSub) -> Any:
    """Close a pub/sub connection at once: a black-holed socket never finishes a
    graceful close (its unsent bytes would keep it open). -> the connection, to
    give back to its pool, or None."""
    conn = ps.connection
    ps.connection = None
    if conn is None:
        return None
    writer = conn._writer  # redis-py offers no abort
    if writer is not None:
        writer.transport.abort()
    conn._close()
    conn.deregister_connect_callback(ps.on_connect)
    return conn
