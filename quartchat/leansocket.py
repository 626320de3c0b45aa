"""What hypercorn keeps per open WebSocket, made smaller.

An idle joined socket cost 36 kB (PSS, 10,000 sockets). tracemalloc over
2,000 of them (2026-12-06) showed much of it in objects sized for traffic an
idle socket never has, or kept after their last use; Python's ``deque`` alone
(760 bytes even when empty, as every ``asyncio.Queue`` and ``asyncio.Event``
makes them) was eight of them per socket. :func:`install` patches, each part
guarded (nothing is patched where hypercorn does not look as expected, and
:func:`install` then returns False):

- ``TaskGroup.spawn_app``: the stream's queue of ASGI events for the app is an
  :class:`AppQueue` (a bounded FIFO on lists, made on first use), not an
  ``asyncio.Queue`` with three deques and an ``Event`` (about 3.3 kB).
- ``WorkerContext.event_class``: hypercorn's events (the h11 protocol's
  ``can_read``, the worker's two) are :class:`LeanEvent`, a
  :class:`~quartchat.flag.Flag` behind hypercorn's async interface.
- ``H11WSConnection.send``: once the ``101 Switching Protocols`` is sent, the
  upgraded connection forgets the h11 state machine it kept (the request's
  parsed headers and buffers, about 1.5 kB); nothing but that answer is ever
  sent through it. A later h11 event fails with h11's own
  ``LocalProtocolError``.
- ``WSStream._accept``: the wsproto connection's (almost always empty) queue of
  received events is a list-backed :class:`SmallFifo`.
- ``TCPServer.__init__``: the asyncio stream protocol's drain waiters are a list
  (it only appends, removes and iterates them).

``tests/test_hypercorn_config.py`` pins that each part still finds what it
patches; ``tests/test_leansocket.py`` runs :class:`AppQueue` and
:class:`LeanEvent` against ``asyncio.Queue`` and ``asyncio.Event`` over random
interleavings (a property test: the same schedule must give the same trace).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from functools import partial
from typing import Any, Generic, TypeVar

from .flag import Flag

__all__ = ["AppQueue", "LeanEvent", "SmallFifo", "install", "installed"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class LeanEvent:
    """hypercorn's ``Event`` interface (async ``set``/``clear``/``wait``, ``is_set``)
    over a :class:`~quartchat.flag.Flag`: no deque until someone waits."""

    __slots__ = ("_flag",)

    def __init__(self) -> None:
        self._flag = Flag()

    async def clear(self) -> None:
        self._flag.clear()

    async def wait(self) -> None:
        await self._flag.wait()

    async def set(self) -> None:
        self._flag.set()

    def is_set(self) -> bool:
        return self._flag.is_set()


def _wake_next(waiters: list[asyncio.Future[None]] | None) -> None:
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            return


class AppQueue(Generic[T]):
    """A bounded FIFO with ``asyncio.Queue``'s ``put``/``get`` semantics (``get`` waits
    while empty, ``put`` waits while ``maxsize`` items are queued, 0 is unbounded;
    waiters are served first come, and a waiter cancelled after its wake-up passes the
    wake-up on), kept in lists made on first use."""

    __slots__ = ("_getters", "_items", "_maxsize", "_putters")

    def __init__(self, maxsize: int = 0) -> None:
        self._items: list[T] = []
        self._maxsize = maxsize
        self._getters: list[asyncio.Future[None]] | None = None
        self._putters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return 0 < self._maxsize <= len(self._items)

    async def put(self, item: T) -> None:
        while self.full():
            if self._putters is None:
                self._putters = []
            putters = self._putters
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            putters.append(waiter)
            try:
                await waiter
            except BaseException:
                _leave(putters, waiter, ready=not self.full())
                raise
        self._items.append(item)
        _wake_next(self._getters)

    async def get(self) -> T:
        # The waits are inline, not in a helper coroutine: an idle socket's app sits
        # here, and a coroutine more would be a frame more kept per socket.
        while not self._items:
            if self._getters is None:
                self._getters = []
            getters = self._getters
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            getters.append(waiter)
            try:
                await waiter
            except BaseException:
                _leave(getters, waiter, ready=bool(self._items))
                raise
        item = self._items.pop(0)
        _wake_next(self._putters)
        return item


def _leave(
    waiters: list[asyncio.Future[None]], waiter: asyncio.Future[None], *, ready: bool
) -> None:
    """A waiter cancelled: out of the line, and if it had been woken and what it waited
    for is there (``ready``), the wake-up passes to the next, as asyncio.Queue does."""
    waiter.cancel()
    if waiter in waiters:
        waiters.remove(waiter)
    if ready and not waiter.cancelled():
        _wake_next(waiters)


class SmallFifo(list[T]):
    """A list with deque's ``popleft``, for queues that hold an item or two."""

    __slots__ = ()

    def popleft(self) -> T:
        return self.pop(0)


_installed: bool | None = None  # install()'s answer, once it has run


def installed() -> bool:
    """True once :func:`install` has patched every part."""
    return bool(_installed)


def install() -> bool:
    """Patch hypercorn (once; later calls return the first answer); False when any
    part is not as expected (the parts that are, are patched)."""
    global _installed
    if _installed is not None:
        return _installed
    try:
        from hypercorn.asyncio import task_group, tcp_server, worker_context
        from hypercorn.protocol import h11 as h11_protocol
        from hypercorn.protocol import ws_stream
    except ImportError:
        _installed = False
        return False
    done = [
        _patch_spawn_app(task_group),
        _patch_event_class(worker_context),
        _patch_upgraded_h11(h11_protocol),
        _patch_accept(ws_stream),
        _patch_streams(tcp_server),
    ]
    _installed = all(done)
    if not _installed:
        log.warning(
            "hypercorn is not as expected: some per-socket savings not applied (%s)",
            ", ".join(name for name, ok in zip(_PARTS, done, strict=True) if not ok),
        )
    return _installed


_PARTS = ("spawn_app", "event_class", "h11 after upgrade", "wsproto events", "drain waiters")


def _names(function: Any) -> tuple[str, ...]:
    return tuple(getattr(getattr(function, "__code__", None), "co_names", ()))


def _patch_spawn_app(module: Any) -> bool:
    tg: Any = getattr(module, "TaskGroup", None)
    handle = getattr(module, "_handle", None)
    spawn_app = getattr(tg, "spawn_app", None)
    expected = {"Queue", "spawn", "run_in_executor"}
    if not (
        asyncio.iscoroutinefunction(spawn_app)
        and asyncio.iscoroutinefunction(handle)
        and expected <= set(_names(spawn_app))
    ):
        return False

    async def _spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        # hypercorn 0.18's spawn_app with an AppQueue for its asyncio.Queue
        queue: AppQueue[Any] = AppQueue(config.max_app_queue_size)
        loop = self._loop

        def _call_soon(func: Any, *args: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(func(*args), loop).result()

        self.spawn(
            handle,
            app,
            config,
            scope,
            queue.get,
            send,
            partial(loop.run_in_executor, None),
            _call_soon,
        )
        return queue.put

    tg.spawn_app = _spawn_app
    return True


def _patch_event_class(module: Any) -> bool:
    context = getattr(module, "WorkerContext", None)
    wrapper = getattr(module, "EventWrapper", None)
    if context is None or getattr(context, "event_class", None) is not wrapper:
        return False
    context.event_class = LeanEvent
    return True


class _Upgraded:
    """What an upgraded connection keeps instead of its h11 state machine."""

    __slots__ = ()

    def send(self, event: Any) -> bytes:
        import h11

        raise h11.LocalProtocolError(f"{type(event).__name__} after the WebSocket upgrade")


_UPGRADED = _Upgraded()


def _patch_upgraded_h11(module: Any) -> bool:
    cls: Any = getattr(module, "H11WSConnection", None)
    send: Any = getattr(cls, "send", None)
    if cls is None or "h11_connection" not in _names(send) or asyncio.iscoroutinefunction(send):
        return False

    def _send(self: Any, event: Any) -> bytes:
        data: bytes = send(self, event)
        if getattr(event, "status_code", None) == 101:
            self.h11_connection = _UPGRADED  # the 101 was the last h11 event
        return data

    cls.send = _send
    return True


def _patch_accept(module: Any) -> bool:
    cls: Any = getattr(module, "WSStream", None)
    accept: Any = getattr(cls, "_accept", None)
    if not asyncio.iscoroutinefunction(accept):
        return False

    async def _accept(self: Any, message: Any) -> None:
        await accept(self, message)
        events = getattr(getattr(self, "connection", None), "_events", None)
        if type(events) is collections.deque and not events:
            self.connection._events = SmallFifo()

    cls._accept = _accept
    return True


def _patch_streams(module: Any) -> bool:
    cls: Any = getattr(module, "TCPServer", None)
    init: Any = getattr(cls, "__init__", None)
    if cls is None or "writer" not in _names(init):
        return False

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        protocol: Any = getattr(getattr(self, "writer", None), "_protocol", None)
        waiters = getattr(protocol, "_drain_waiters", None)
        if type(waiters) is collections.deque and not waiters:
            protocol._drain_waiters = []

    cls.__init__ = __init__
    return True
