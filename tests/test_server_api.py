"""The server API in one process (Quart's test client, memory:// broker): keys, bodies,
publish with its retry key, kick and disconnect. tests/test_server_api_cluster.py runs
the cross-server part on two real servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError

from quartchat.app import create_app
from quartchat.config import Settings

from .test_websocket import WS, connect

API_KEY = "api-key-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[Quart]:
    application = create_app(make_settings(api_key=API_KEY, rate_per_s=0, max_content=64))
    async with application.test_app():
        yield application


async def post(
    app: Quart,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    client = app.test_client()
    if raw is not None:
        response = await client.post(
            path, data=raw, headers=headers if headers is not None else AUTH
        )
    else:
        response = await client.post(
            path, json=body, headers=headers if headers is not None else AUTH
        )
    return response.status_code, await response.get_json()


ROUTES = [
    ("/api/rooms/r/messages", {"sender_id": "a", "content": "hi"}),
    ("/api/users/a/disconnect", None),
    ("/api/rooms/r/kick", {"sender_id": "a"}),
]


async def test_no_api_key_configured_is_404(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    async with app.test_app():
        for path, body in ROUTES:
            status, answer = await post(app, path, body)
            assert status == 404 and answer["error"], path
        # The public read route next to it still works.
        assert (await app.test_client().get("/api/rooms/r/messages")).status_code == 200


async def test_wrong_or_missing_key_is_401(app: Quart) -> None:
    for path, body in ROUTES:
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": API_KEY},
            {"Authorization": f"Basic {API_KEY}"},
            {"Authorization": f"Bearer {API_KEY}x"},
        ):
            status, answer = await post(app, path, body, headers=headers)
            assert (status, answer["error"]) == (401, "unauthorized"), (path, headers)
            text = orjson.dumps(answer).decode()
            assert API_KEY not in text
            assert all(p not in text for p in headers.get("Authorization", "").split()), answer


async def test_publish_stores_then_delivers_once_and_a_retry_is_200(app: Quart) -> None:
    async with connect(app, "bob") as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "r"})
        await ws.expect("joined")
        status, first = await post(
            app,
            "/api/rooms/r/messages",
            {"sender_id": "system", "content": "hello", "client_msg_id": "k1"},
        )
        assert status == 201
        assert set(first) == {
            "room_id",
            "seq",
            "id",
            "sender_id",
            "content",
            "sent_at",
            "client_msg_id",
        }
        assert (
            first["room_id"],
            first["seq"],
            first["sender_id"],
            first["content"],
            first["client_msg_id"],
        ) == ("r", 1, "system", "hello", "k1")
        delivered = await ws.expect("message")
        assert delivered["id"] == first["id"] and delivered["sender_id"] == "system"
        status, again = await post(
            app,
            "/api/rooms/r/messages",
            {"sender_id": "system", "content": "hello", "client_msg_id": "k1"},
        )
        assert status == 200 and again == first
        # A socket post and an API post interleave in one order.
        await ws.send({"action": "message", "room_id": "r", "content": "from bob"})
        status, third = await post(
            app, "/api/rooms/r/messages", {"sender_id": "system", "content": "no id"}
        )
        assert status == 201 and third["client_msg_id"] is None
        frames = [await ws.recv() for _ in range(3)]
        assert sorted(f["seq"] for f in frames if f["type"] == "message") == [2, 3]
        await ws.silent(0.2)  # the retry was not delivered again
    rows, _ = await app.extensions["quartchat"].store.page("r", None, 10)
    assert [r.seq for r in rows] == [1, 2, 3]


async def test_socket_and_api_share_the_retry_key(app: Quart) -> None:
    async with connect(app, "alice") as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "r"})
        await ws.expect("joined")
        await ws.send(
            {"action": "message", "room_id": "r", "content": "mine", "client_msg_id": "c"}
        )
        ack = next(f for f in [await ws.recv(), await ws.recv()] if f["type"] == "ack")
        status, body = await post(
            app,
            "/api/rooms/r/messages",
            {"sender_id": "alice", "content": "other", "client_msg_id": "c"},
        )
        assert status == 200 and (body["seq"], body["id"], body["content"]) == (
            ack["seq"],
            ack["id"],
            "mine",
        )
        status, body = await post(
            app,
            "/api/rooms/r/messages",
            {"sender_id": "bob", "content": "bob's", "client_msg_id": "c"},
        )
        assert status == 201 and body["seq"] == 2


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/api/rooms/r/messages", {"content": "hi"}, "invalid_field"),
        ("/api/rooms/r/messages", {"sender_id": "bad id", "content": "hi"}, "invalid_field"),
        ("/api/rooms/r/messages", {"sender_id": "a", "content": ""}, "invalid_field"),
        ("/api/rooms/r/messages", {"sender_id": "a", "content": 5}, "invalid_field"),
        ("/api/rooms/r/messages", {"sender_id": "a", "content": "x" * 65}, "too_large"),
        (
            "/api/rooms/r/messages",
            {"sender_id": "a", "content": "hi", "client_msg_id": ""},
            "invalid_field",
        ),
        ("/api/rooms/r/messages", [1], "invalid_json"),
        ("/api/rooms/bad%20room/messages", {"sender_id": "a", "content": "hi"}, "invalid_field"),
        ("/api/rooms/a@b/kick", {"sender_id": "a"}, "invalid_field"),
        ("/api/rooms/r/kick", {}, "invalid_field"),
        ("/api/users/bad%20id/disconnect", None, "invalid_field"),
    ],
)
async def test_bad_bodies_are_400(app: Quart, path: str, body: Any, code: str) -> None:
    status, answer = await post(app, path, body)
    assert (status, answer["error"]) == (400, code), answer
    assert answer["message"]


async def test_not_json_is_400(app: Quart) -> None:
    status, answer = await post(
        app,
        "/api/rooms/r/messages",
        raw=b"{oops",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert (status, answer["error"]) == (400, "invalid_json")
    status, answer = await post(app, "/api/rooms/r/messages", raw=b"x" * 70000)
    assert (status, answer["error"]) == (400, "too_large")


async def test_kick_leaves_every_connection_of_the_sender(app: Quart) -> None:
    async with connect(app, "alice") as a1, connect(app, "alice") as a2, connect(app, "bob") as b:
        sockets = [WS(a1), WS(a2), WS(b)]
        for ws in reversed(sockets):  # bob first: he hears alice arrive
            await ws.expect("welcome")
            await ws.send({"action": "join", "room_id": "r"})
            await ws.expect("joined")
        await sockets[2].expect("presence")  # alice joined (once, first connection)
        status, body = await post(app, "/api/rooms/r/kick", {"sender_id": "alice"})
        assert (status, body) == (202, {"status": "accepted"})
        for ws in sockets[:2]:
            assert await ws.expect("left") == {"type": "left", "room_id": "r", "reason": "kicked"}
        presence = await sockets[2].expect("presence")
        assert (presence["event"], presence["sender_id"]) == ("leave", "alice")
        await sockets[0].send({"action": "message", "room_id": "r", "content": "hi"})
        assert (await sockets[0].expect("error"))["code"] == "not_joined"
        # Not a ban: alice may join again.
        await sockets[0].send({"action": "join", "room_id": "r"})
        assert "alice" in (await sockets[0].expect("joined"))["members"]
        # Kicking someone who is not there is accepted and does nothing.
        assert (await post(app, "/api/rooms/r/kick", {"sender_id": "nobody"}))[0] == 202


async def test_disconnect_closes_every_connection_of_the_sender_with_4003(app: Quart) -> None:
    async with connect(app, "alice") as a1, connect(app, "alice") as a2, connect(app, "bob") as b:
        sockets = [WS(a1), WS(a2), WS(b)]
        for ws in sockets:
            await ws.expect("welcome")
        status, body = await post(app, "/api/users/alice/disconnect")
        assert (status, body) == (202, {"status": "accepted"})
        for ws in sockets[:2]:
            with pytest.raises(WebsocketDisconnectError) as info:
                await ws.recv(timeout=2)
            assert info.value.args[0] == 4003
        await sockets[2].send({"action": "ping"})
        await sockets[2].expect("pong")


async def test_api_publish_while_draining_is_503(app: Quart) -> None:
    hub = app.extensions["quartchat"]
    await hub.drain()
    status, body = await post(app, "/api/rooms/r/messages", {"sender_id": "a", "content": "hi"})
    assert (status, body["error"]) == (503, "unavailable")
    await asyncio.sleep(0)
