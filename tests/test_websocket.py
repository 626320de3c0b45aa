"""The /chat WebSocket and the HTTP routes, through Quart's test client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError

from quartchat.app import create_app
from quartchat.config import Settings


class WS:
    """A test-client socket that decodes frames and skips nothing."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(
            frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        )

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return orjson.loads(await self.ws.receive())  # type: ignore[no-any-return]

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == type_, frame
        return frame

    async def silent(self, timeout: float = 0.1) -> None:
        """Assert nothing arrives within ``timeout``."""
        with pytest.raises(TimeoutError):
            frame = await self.recv(timeout)
            raise AssertionError(f"unexpected frame {frame}")


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[Quart]:
    application = create_app(
        make_settings(rate_per_s=1000, rate_burst=1000, max_rooms=3, max_content=64)
    )
    async with application.test_app():
        yield application


def connect(app: Quart, sender: str = "alice", **kw: Any) -> Any:
    return app.test_client().websocket(f"/chat?sender_id={sender}", **kw)


async def test_console_flow_join_message_leave(app: Quart) -> None:
    async with connect(app, "test_user") as raw:
        ws = WS(raw)
        welcome = await ws.expect("welcome")
        assert welcome["sender_id"] == "test_user" and welcome["protocol"] == 1
        assert welcome["limits"] == {"max_content": 64, "max_rooms": 3, "rate_per_s": 1000}
        assert welcome["connection_id"] and welcome["server_id"] == "test-1"
        await ws.send({"action": "join", "room_id": "room101"})
        joined = await ws.expect("joined")
        assert joined == {
            "type": "joined",
            "room_id": "room101",
            "last_seq": 0,
            "members": ["test_user"],
        }
        await ws.send({"action": "message", "room_id": "room101", "content": "Hello, world!"})
        frames = [await ws.recv(), await ws.recv()]
        ack = next(f for f in frames if f["type"] == "ack")
        msg = next(f for f in frames if f["type"] == "message")
        assert ack == {
            "type": "ack",
            "room_id": "room101",
            "seq": 1,
            "id": msg["id"],
            "client_msg_id": None,
        }
        assert msg["content"] == "Hello, world!" and msg["sender_id"] == "test_user"
        assert msg["sent_at"].endswith("Z") and len(msg["sent_at"]) == 24
        await ws.send({"action": "leave", "room_id": "room101"})
        assert await ws.expect("left") == {"type": "left", "room_id": "room101"}
        await ws.send({"action": "ping"})
        assert await ws.expect("pong") == {"type": "pong"}


async def test_every_bad_input_gets_its_error_and_the_socket_stays_usable(app: Quart) -> None:
    async with connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        cases: list[tuple[Any, str]] = [
            ("{oops", "invalid_json"),
            ("[1]", "invalid_json"),
            (b"\x00\x01", "unsupported_frame"),
            ({"action": "fly"}, "unknown_action"),
            ({"room_id": "r"}, "invalid_field"),
            ({"action": "join"}, "invalid_field"),
            ({"action": "join", "room_id": 5}, "invalid_field"),
            ({"action": "join", "room_id": "bad room"}, "invalid_field"),
            ({"action": "join", "room_id": "r" * 65}, "invalid_field"),
            ({"action": "message", "room_id": "r", "content": ""}, "invalid_field"),
            ({"action": "message", "room_id": "r", "content": "x" * 65}, "too_large"),
            ({"action": "message", "room_id": "r", "content": "hi"}, "not_joined"),
            ({"action": "leave", "room_id": "r"}, "not_joined"),
            ({"action": "history", "room_id": "r", "limit": 0}, "invalid_field"),
            ({"action": "history", "room_id": "r", "limit": 101}, "invalid_field"),
        ]
        for frame, code in cases:
            await ws.send(frame)
            err = await ws.expect("error")
            assert err["code"] == code, (frame, err)
            assert err["message"]
        # Still usable after all of that.
        await ws.send({"action": "join", "room_id": "r"})
        await ws.expect("joined")
        await ws.send(
            {"action": "message", "room_id": "r", "content": "x" * 65, "client_msg_id": "c1"}
        )
        err = await ws.expect("error")
        assert (err["code"], err["action"], err["room_id"], err["client_msg_id"]) == (
            "too_large",
            "message",
            "r",
            "c1",
        )


async def test_pipelined_failures_each_echo_their_request(app: Quart) -> None:
    """Every action's failures, sent back to back before any answer is read: each
    error echoes its own request's action, and room_id / client_msg_id when the
    request carried them well formed (PROTOCOL.md), whichever part refused it."""
    pipelined: list[tuple[dict[str, Any] | str, dict[str, Any]]] = [
        ({"action": "fly", "room_id": "r"}, {"code": "unknown_action", "action": "fly"}),
        ({"action": "refresh", "token": "t"}, {"code": "unknown_action", "action": "refresh"}),
        (
            {"action": "join", "room_id": "j", "since_seq": -1},
            {"code": "invalid_field", "action": "join", "room_id": "j"},
        ),
        (
            {"action": "join", "room_id": "bad room"},
            {"code": "invalid_field", "action": "join"},
        ),
        ({"action": "join", "room_id": "a"}, {"type": "joined"}),
        ({"action": "join", "room_id": "b"}, {"type": "joined"}),
        ({"action": "join", "room_id": "c"}, {"type": "joined"}),
        (
            {"action": "join", "room_id": "d"},
            {"code": "too_many_rooms", "action": "join", "room_id": "d"},
        ),
        (
            {"action": "leave", "room_id": "x"},
            {"code": "not_joined", "action": "leave", "room_id": "x"},
        ),
        (
            {"action": "message", "room_id": "x", "content": "hi", "client_msg_id": "m1"},
            {"code": "not_joined", "action": "message", "room_id": "x", "client_msg_id": "m1"},
        ),
        (
            {"action": "message", "room_id": "a", "content": "x" * 65, "client_msg_id": "m2"},
            {"code": "too_large", "action": "message", "room_id": "a", "client_msg_id": "m2"},
        ),
        (
            {"action": "message", "room_id": "a", "content": "hi", "client_msg_id": ""},
            {"code": "invalid_field", "action": "message", "room_id": "a"},
        ),
        (
            {"action": "message", "room_id": "a", "content": 5, "client_msg_id": "m3"},
            {"code": "invalid_field", "action": "message", "room_id": "a", "client_msg_id": "m3"},
        ),
        (
            {"action": "history", "room_id": "h", "limit": 0},
            {"code": "invalid_field", "action": "history", "room_id": "h"},
        ),
        (
            # Over the frame limit: refused unparsed, the envelope read by a bounded parse.
            {"action": "ping", "room_id": "p", "pad": "x" * 70_000},
            {"code": "too_large", "action": "ping", "room_id": "p"},
        ),
        ({"action": "ping"}, {"type": "pong"}),
    ]
    async with connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        for frame, _ in pipelined:
            await ws.send(frame)
        got = [await ws.recv() for _ in pipelined]
    # Errors come in request order; a room's answers (joined) may come later.
    errors = [frame for frame in got if frame["type"] == "error"]
    for frame in errors:
        assert frame.pop("message")
    assert errors == [{"type": "error", **want} for _, want in pipelined if "type" not in want]
    others = sorted(frame["type"] for frame in got if frame["type"] != "error")
    assert others == sorted(want["type"] for _, want in pipelined if "type" in want)


async def test_too_many_rooms(app: Quart) -> None:
    async with connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        for room in ("a", "b", "c"):
            await ws.send({"action": "join", "room_id": room})
            await ws.expect("joined")
        await ws.send({"action": "join", "room_id": "d"})
        err = await ws.expect("error")
        assert err["code"] == "too_many_rooms" and err["room_id"] == "d"
        await ws.send({"action": "join", "room_id": "a"})  # re-joining a joined room is fine
        await ws.expect("joined")
        await ws.send({"action": "leave", "room_id": "a"})
        await ws.expect("left")
        await ws.send({"action": "join", "room_id": "d"})
        await ws.expect("joined")


async def test_rate_limit(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(rate_per_s=1, rate_burst=3))
    async with app.test_app(), connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        for _ in range(3):
            await ws.send({"action": "ping"})
        for _ in range(3):
            await ws.expect("pong")
        await ws.send({"action": "ping"})
        err = await ws.expect("error")
        assert err["code"] == "rate_limited"
        await asyncio.sleep(1.1)  # one token refills
        await ws.send({"action": "ping"})
        await ws.expect("pong")


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "invalid_field"),
        ("?sender_id=", 400, "invalid_field"),
        ("?sender_id=bad%20id", 400, "invalid_field"),
        ("?sender_id=" + "x" * 65, 400, "invalid_field"),
    ],
)
async def test_handshake_refusals(app: Quart, query: str, status: int, code: str) -> None:
    with pytest.raises(WebsocketResponseError) as info:
        async with app.test_client().websocket(f"/chat{query}") as ws:
            await ws.receive()
    response = info.value.response
    assert response.status_code == status
    body = orjson.loads(await response.get_data())
    assert body["error"] == code and body["message"]


async def test_origin_check(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(allowed_origins=("https://chat.example",)))
    async with app.test_app():
        with pytest.raises(WebsocketResponseError) as info:
            async with app.test_client().websocket(
                "/chat?sender_id=a", headers={"Origin": "https://evil.example"}
            ) as ws:
                await ws.receive()
        assert info.value.response.status_code == 403
        async with app.test_client().websocket(
            "/chat?sender_id=a", headers={"Origin": "https://chat.example"}
        ) as raw:
            await WS(raw).expect("welcome")


async def test_two_members_see_each_other_and_the_same_order(app: Quart) -> None:
    async with connect(app, "alice") as ra, connect(app, "bob") as rb:
        a, b = WS(ra), WS(rb)
        await a.expect("welcome")
        await b.expect("welcome")
        await a.send({"action": "join", "room_id": "r"})
        await a.expect("joined")
        await b.send({"action": "join", "room_id": "r"})
        joined = await b.expect("joined")
        assert joined["members"] == ["alice", "bob"]
        presence = await a.expect("presence")
        assert presence == {"type": "presence", "room_id": "r", "event": "join", "sender_id": "bob"}
        for i in range(5):
            await a.send({"action": "message", "room_id": "r", "content": f"a{i}"})
            await b.send({"action": "message", "room_id": "r", "content": f"b{i}"})
        seen_a = [f for f in [await a.recv() for _ in range(15)] if f["type"] == "message"]
        seen_b = [f for f in [await b.recv() for _ in range(15)] if f["type"] == "message"]
        assert [m["seq"] for m in seen_a] == list(range(1, 11))
        assert [m["id"] for m in seen_a] == [m["id"] for m in seen_b]
        await b.send({"action": "leave", "room_id": "r"})
        await b.expect("left")
        assert (await a.expect("presence"))["event"] == "leave"


async def test_http_routes(app: Quart) -> None:
    client = app.test_client()
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and (await ready.get_json())["status"] == "ready"
    home = await client.get("/", headers={"Accept": "application/json"})
    assert (await home.get_json())["status"] == "ok"
    browser = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    # PROTOCOL.md: a redirect to the web client or the page itself (now the page).
    assert browser.status_code == 200 and "/static/app.js" in (await browser.get_data(as_text=True))
    metrics = await client.get("/metrics")
    assert b"quartchat_connections_open" in await metrics.get_data()

    async with connect(app, "alice") as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "lobby"})
        await ws.expect("joined")
        for i in range(3):
            await ws.send({"action": "message", "room_id": "lobby", "content": f"m{i}"})
        for _ in range(6):
            await ws.recv()
        rooms = await (await client.get("/api/rooms")).get_json()
        assert rooms == {"rooms": [{"room_id": "lobby", "members": 1}]}
        members = await (await client.get("/api/rooms/lobby/members")).get_json()
        assert members == {"room_id": "lobby", "members": ["alice"]}
    page1 = await (await client.get("/api/rooms/lobby/messages?limit=2")).get_json()
    assert [m["seq"] for m in page1["messages"]] == [2, 3] and page1["has_more"] is True
    assert page1["messages"][0]["type"] == "message"
    page2 = await (await client.get("/api/rooms/lobby/messages?before_seq=2")).get_json()
    assert [m["seq"] for m in page2["messages"]] == [1] and page2["has_more"] is False
    empty = await client.get("/api/rooms/never-used/messages")
    assert empty.status_code == 200 and (await empty.get_json())["messages"] == []
    for bad in (
        "/api/rooms/lobby/messages?limit=0",
        "/api/rooms/lobby/messages?limit=x",
        "/api/rooms/lobby/messages?before_seq=-3",
        "/api/rooms/bad%20room/messages",
    ):
        response = await client.get(bad)
        assert response.status_code == 400, bad
        body = await response.get_json()
        assert body["error"] and body["message"]
    missing = await client.get("/nope")
    assert missing.status_code == 404 and (await missing.get_json())["error"]


async def test_drain_closes_sockets_with_1001_after_acking(app: Quart) -> None:
    hub = app.extensions["quartchat"]
    async with connect(app, "alice") as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "r"})
        await ws.expect("joined")
        await ws.send({"action": "message", "room_id": "r", "content": "last words"})
        await asyncio.sleep(0)  # the frame is in; drain starts while it is in flight
        drain = asyncio.create_task(hub.drain())
        got = []
        with pytest.raises(WebsocketDisconnectError) as info:
            while True:
                got.append(await ws.recv())
        assert info.value.args[0] == 1001
        await drain
        assert {f["type"] for f in got} == {"ack", "message"}
    assert (await app.test_client().get("/readyz")).status_code == 503
    with pytest.raises(WebsocketResponseError) as refused:
        async with connect(app, "late") as raw:
            await raw.receive()
    assert refused.value.response.status_code == 503


async def test_repeated_abuse_is_closed_with_1008(app: Quart) -> None:
    async with connect(app) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        with pytest.raises(WebsocketDisconnectError) as info:
            for _ in range(1000):
                await ws.send("garbage")
                await ws.recv()
        assert info.value.args[0] == 1008


async def test_clients_table_records_first_and_last_seen(app: Quart, db_url: str) -> None:
    import sqlite3

    hub = app.extensions["quartchat"]
    async with connect(app, "visitor") as raw:
        await WS(raw).expect("welcome")
    await asyncio.sleep(0.05)
    await hub.clients.flush()
    path = db_url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT sender_id, first_seen, last_seen FROM clients").fetchall()
    assert [r[0] for r in rows] == ["visitor"]
    assert rows[0][1] <= rows[0][2]
    async with connect(app, "visitor") as raw:
        await WS(raw).expect("welcome")
    await asyncio.sleep(0.05)
    await hub.clients.flush()
    with sqlite3.connect(path) as conn:
        again = conn.execute("SELECT first_seen, last_seen FROM clients").fetchall()
    assert again[0][0] == rows[0][1] and again[0][1] > rows[0][2]
