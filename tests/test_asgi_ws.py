"""InlineWebsocketConnection: Quart's WebSocket semantics for a route that reads, with no
task of its own per socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from quart import Quart, websocket
from quart.asgi import ASGIWebsocketConnection

from quartchat.asgi_ws import InlineWebsocketConnection


def _app(cls: Any, seen: dict[str, Any]) -> Quart:
    app = Quart(__name__)
    app.asgi_websocket_class = cls

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        seen["tasks_open"] = len(asyncio.all_tasks())
        try:
            while True:
                message = await websocket.receive()
                if message == "bye":
                    await websocket.send("leaving")
                    return
                seen.setdefault("got", []).append(message)
                await websocket.send(f"echo {message}")
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    return app


@pytest.mark.parametrize("cls", [ASGIWebsocketConnection, InlineWebsocketConnection])
async def test_the_client_going_away_cancels_the_route_and_leaves_no_task(cls: Any) -> None:
    seen: dict[str, Any] = {}
    before = len(asyncio.all_tasks())
    async with _app(cls, seen).test_client().websocket("/ws") as ws:
        await ws.send("a")
        assert await ws.receive() == "echo a"
        await ws.send("b")
        assert await ws.receive() == "echo b"
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen["got"] == ["a", "b"] and seen["cancelled"]
    assert len(asyncio.all_tasks()) == before


async def test_the_route_ending_ends_the_socket() -> None:
    seen: dict[str, Any] = {}
    before = len(asyncio.all_tasks())
    async with _app(InlineWebsocketConnection, seen).test_client().websocket("/ws") as ws:
        await ws.send("bye")
        assert await ws.receive() == "leaving"
    for _ in range(20):
        await asyncio.sleep(0)
    assert "cancelled" not in seen
    assert len(asyncio.all_tasks()) == before


async def test_two_tasks_fewer_per_socket_than_quarts_own() -> None:
    counts = {}
    for cls in (ASGIWebsocketConnection, InlineWebsocketConnection):
        seen: dict[str, Any] = {}
        async with _app(cls, seen).test_client().websocket("/ws") as ws:
            await ws.send("a")
            await ws.receive()
        counts[cls] = seen["tasks_open"]
    assert counts[InlineWebsocketConnection] == counts[ASGIWebsocketConnection] - 2, counts


def _scope() -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
    }


async def test_a_cancellation_from_outside_goes_on() -> None:
    """hypercorn cancelling the ASGI task (its shutdown) is not swallowed."""
    seen: dict[str, Any] = {}
    app = _app(InlineWebsocketConnection, seen)
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await incoming.put({"type": "websocket.connect"})
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    scope = _scope()
    before = len(asyncio.all_tasks())
    call = asyncio.create_task(app(scope, incoming.get, send))  # type: ignore[arg-type]
    for _ in range(50):
        await asyncio.sleep(0)
        if "tasks_open" in seen:
            break
    assert sent and sent[0]["type"] == "websocket.accept"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert seen["cancelled"]
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


async def test_a_disconnect_in_the_turn_the_route_ends_is_not_a_cancellation() -> None:
    """The client's disconnect and the route's return in the same loop turn (with
    Quart's reader task, its done callback then cancelled the finished route)."""
    seen: dict[str, Any] = {}
    app = Quart(__name__)
    app.asgi_websocket_class = InlineWebsocketConnection
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    route_may_end = asyncio.Event()

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        await route_may_end.wait()
        seen["ended"] = True

    async def receive() -> dict[str, Any]:
        return await incoming.get()

    async def send(_event: dict[str, Any]) -> None:
        return None

    await incoming.put({"type": "websocket.connect"})
    call = asyncio.create_task(app(_scope(), receive, send))  # type: ignore[arg-type]
    for _ in range(50):
        await asyncio.sleep(0)
    # Both wake in the next turn, the reader first: it sees the disconnect and ends
    # (its done callback is scheduled), then the route returns.
    incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    route_may_end.set()
    async with asyncio.timeout(5):
        await call  # returns: no CancelledError
    assert seen["ended"] and not call.cancelled()


def test_it_sets_what_quarts_init_sets_but_the_queue() -> None:
    """Its __init__ is Quart's without the asyncio.Queue (made per handshake and dropped):
    if Quart's sets anything else, ours must too."""
    app = Quart(__name__)
    scope: Any = {"type": "websocket"}
    theirs = vars(ASGIWebsocketConnection(app, scope))
    ours = vars(InlineWebsocketConnection(app, scope))
    assert set(theirs) - {"queue"} == set(ours)
    assert {k: v for k, v in theirs.items() if k != "queue"} == ours


@pytest.mark.parametrize("cls", [ASGIWebsocketConnection, InlineWebsocketConnection])
async def test_receiver_reads_the_inline_connection_directly_and_any_other_through_quart(
    cls: Any,
) -> None:
    """receiver() is the inline connection's own get (no accept call per message), or
    Quart's receive for any other websocket; both read the same messages in order."""
    from quartchat.asgi_ws import receiver

    app = Quart(__name__)
    app.asgi_websocket_class = cls
    kinds: list[str] = []

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        raw: Any = websocket._get_current_object()  # type: ignore[attr-defined]
        receive = receiver(raw)
        kinds.append(type(getattr(receive, "__self__", None)).__name__)
        while True:
            await websocket.send(f"echo {await receive()}")

    async with app.test_client().websocket("/ws") as client:
        for text in ("a", "b", "c"):
            await client.send(text)
        assert [await client.receive() for _ in range(3)] == ["echo a", "echo b", "echo c"]
    assert kinds == (["_Inbound"] if cls is InlineWebsocketConnection else ["Websocket"])
