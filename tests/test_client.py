"""quartchat.client against a real `quartchat serve`, and a scripted fake server (jwt, 4003)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import pytest
import websockets

from quartchat.client import ChatClient, PostFailed, backoff_delay

from .servers import ServerProcess, free_port


def rows(db: Path, room: str) -> list[tuple[int, str, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return list(
            conn.execute(
                "SELECT seq, sender_id, content, client_msg_id FROM messages "
                "WHERE room_id = ? ORDER BY seq",
                (room,),
            )
        )


@pytest.fixture
def make_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    servers: list[ServerProcess] = []

    def make(port: int | None = None, **env: str) -> ServerProcess:
        s = ServerProcess(
            tmp_path,
            {
                "QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db",
                "QUARTCHAT_RATE_PER_S": "0",
                **env,
            },
            port=port,
        )
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()


def collector() -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], None]]:
    seen: list[dict[str, Any]] = []
    return seen, seen.append


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff_delay(0, 1.0, 8.0, lambda: 0.0) == 0.5
    assert backoff_delay(2, 1.0, 8.0, lambda: 1.0) == 4.0
    assert backoff_delay(20, 1.0, 8.0, lambda: 1.0) == 8.0


def test_a_bad_sender_id_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="sender_id must match"):
        ChatClient("ws://127.0.0.1:1/chat", sender_id="no spaces")


async def test_post_ack_delivery_history_and_members(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server()
    bob_seen, on_bob = collector()
    async with (
        ChatClient(srv.url, sender_id="alice") as alice,
        ChatClient(srv.url, sender_id="bob", on_message=on_bob) as bob,
    ):
        await alice.join("room1")
        await bob.join("room1")
        await alice.wait_for(lambda: "bob" in alice.members("room1"))
        posts = [await alice.send("room1", f"hi {i}") for i in range(3)]
        assert [p.seq for p in posts] == [1, 2, 3] and all(p.state == "sent" for p in posts)
        got = [await alice.next_message(timeout=5) for _ in range(3)]
        assert [m["content"] for m in got] == ["hi 0", "hi 1", "hi 2"]
        await bob.wait_for(lambda: len(bob_seen) == 3)
        assert [m["seq"] for m in bob_seen] == [1, 2, 3]
        page = await bob.history("room1", before_seq=3, limit=10)
        assert [m["seq"] for m in page["messages"]] == [1, 2] and page["has_more"] is False
        with pytest.raises(PostFailed) as failed:
            await alice.send("room1", "x" * 5000)
        assert failed.value.code == "too_large"


async def test_server_killed_and_restarted_nothing_missed_nothing_twice(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    srv = make_server(port)
    seen, on_message = collector()
    reader = await ChatClient(
        srv.url, sender_id="reader", on_message=on_message, backoff_max=0.5
    ).start()
    try:
        await reader_sees_restart(reader, seen, srv, make_server, port, tmp_path)
    finally:
        await reader.close()


async def reader_sees_restart(
    reader: ChatClient,
    seen: list[dict[str, Any]],
    srv: ServerProcess,
    make_server: Callable[..., ServerProcess],
    port: int,
    tmp_path: Path,
) -> None:
    await reader.join("r")
    async with ChatClient(srv.url, sender_id="writer") as writer:
        await writer.join("r")
        for i in range(5):
            await writer.send("r", f"before {i}")
    await reader.wait_for(lambda: len(seen) == 5)

    srv.signal(signal.SIGKILL, group=True)
    srv.wait(10)
    await reader.wait_for(lambda: reader.state != "open")
    offline = reader.post("r", "written while the server was down")
    assert offline.state == "pending"

    srv2 = make_server(port)
    # Another client posts 25 as soon as the server is back: some before the
    # reader's rejoin (replayed by since_seq), maybe some after (live).
    async with ChatClient(srv2.url, sender_id="writer") as writer:
        await writer.join("r")
        for i in range(25):
            await writer.send("r", f"after {i}")
    await offline.wait(timeout=20)
    await reader.wait_for(lambda: len(seen) == 31, timeout=20)
    contents = [m["content"] for m in seen]
    assert [m["seq"] for m in seen] == list(range(1, 32))
    assert contents[:5] == [f"before {i}" for i in range(5)]
    assert [c for c in contents if c.startswith("after")] == [f"after {i}" for i in range(25)]
    assert contents.count("written while the server was down") == 1
    assert reader.reconnects >= 1
    stored = rows(tmp_path / "chat.db", "r")
    assert len(stored) == 31
    assert [r[2] for r in stored].count("written while the server was down") == 1


async def test_rate_limited_posts_are_retried_until_stored_once(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(QUARTCHAT_RATE_PER_S="5", QUARTCHAT_RATE_BURST="3")
    async with ChatClient(srv.url, sender_id="fast", retry_initial=0.2) as fast:
        await fast.join("r")
        posts = [fast.post("r", f"p{i}") for i in range(12)]
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in posts)), 30)
        assert any(e["code"] == "rate_limited" for e in fast.errors), "the limit was hit"
    stored = rows(tmp_path / "chat.db", "r")
    assert sorted(r[2] for r in stored) == sorted(f"p{i}" for i in range(12))
    assert len({r[3] for r in stored}) == 12


class FakeServer:
    """A scripted WebSocket server: records each connection's query and frames."""

    def __init__(self, script: Callable[[Any, dict[str, list[str]], FakeServer], Any]) -> None:
        self.script = script
        self.queries: list[dict[str, list[str]]] = []
        self.frames: list[dict[str, Any]] = []
        self.server: Any = None

    async def __aenter__(self) -> Self:
        async def handler(ws: Any) -> None:
            query = parse_qs(urlsplit(ws.request.path).query)
            self.queries.append(query)
            await self.script(ws, query, self)

        self.server = await websockets.serve(handler, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/chat"

    async def recv(self, ws: Any) -> dict[str, Any]:
        frame = json.loads(await ws.recv())
        self.frames.append(frame)
        return frame


def welcome(sub: str, **extra: Any) -> str:
    return json.dumps(
        {
            "type": "welcome",
            "sender_id": sub,
            "connection_id": "c",
            "server_id": "fake",
            "protocol": 1,
            "limits": {"max_content": 4096, "max_rooms": 100, "rate_per_s": 20},
            **extra,
        }
    )


async def test_cancelling_the_sender_as_it_wakes_ends_it() -> None:
    """A cancel landing as the sender's wake-up completes must end the sender.

    Python 3.11's ``asyncio.wait_for`` swallowed it there: the sender looped on
    for ever, ``close()`` (and asyncio.run's teardown) waited for it for ever,
    and a CI run hung for 90 minutes on a failed test's unclosed client."""

    async def script(ws: Any, query: dict[str, list[str]], fake: FakeServer) -> None:
        await ws.send(welcome(query["sender_id"][0]))
        await ws.wait_closed()

    async with FakeServer(script) as fake:
        client = await ChatClient(fake.url, sender_id="alice").start()
        try:
            await asyncio.sleep(0.05)  # the sender is parked in its wait
            (sender,) = [
                t for t in asyncio.all_tasks() if t.get_name() == "quartchat-client:sender"
            ]
            client._wake.set()
            sender.cancel()
            done, _ = await asyncio.wait([sender], timeout=3)
            assert done, "the sender swallowed its cancellation"
        finally:
            await asyncio.wait_for(client.close(), 5)


async def test_close_4003_is_final() -> None:
    async def script(ws: Any, query: dict[str, list[str]], fake: FakeServer) -> None:
        await ws.send(welcome(query["sender_id"][0]))
        await ws.close(4003, "disconnected by the application")

    async with FakeServer(script) as fake:
        client = await ChatClient(fake.url, sender_id="alice", backoff_initial=0.01).start()
        await client.wait_for(lambda: client.state == "closed")
        await asyncio.sleep(0.2)  # several backoff periods: nothing more may happen
        assert len(fake.queries) == 1 and client.close_codes == [4003]
        await client.close()


async def test_jwt_token_in_query_refresh_before_expiry_and_new_token_after_4001() -> None:
    tokens = iter(f"tok{i}" for i in range(1, 100))

    async def get_token() -> str:
        return next(tokens)

    async def script(ws: Any, query: dict[str, list[str]], fake: FakeServer) -> None:
        assert "sender_id" not in query
        soon = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat(timespec="milliseconds")
        await ws.send(welcome("sub-1", expires_at=soon.replace("+00:00", "Z")))
        if len(fake.queries) == 1:
            frame = await fake.recv(ws)
            assert frame["action"] == "refresh"
            later = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="milliseconds")
            await ws.send(
                json.dumps({"type": "refreshed", "expires_at": later.replace("+00:00", "Z")})
            )
            await ws.close(4001, "token expired")
        else:
            await ws.wait_closed()

    async with FakeServer(script) as fake:
        client = ChatClient(fake.url, get_token=get_token, refresh_margin=0.1, backoff_initial=0.01)
        await client.start()
        assert client.sender_id == "sub-1"
        await client.wait_for(lambda: len(fake.queries) == 2 and client.state == "open")
        assert fake.queries[0]["token"] == ["tok1"]
        assert [f for f in fake.frames if f["action"] == "refresh"] == [
            {"action": "refresh", "token": "tok2"}
        ]
        assert fake.queries[1]["token"] == ["tok3"], "a fresh token after 4001"
        assert client.close_codes == [4001]
        await client.close()


async def test_a_refused_handshake_is_recorded_and_retried(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(QUARTCHAT_ALLOWED_ORIGINS="https://chat.example")
    client = ChatClient(
        srv.url,
        sender_id="alice",
        backoff_initial=0.05,
        backoff_max=0.1,
        connect_options={"origin": "https://evil.example"},
    )
    task = asyncio.create_task(client.start())
    try:
        await client.wait_for(lambda: len(client.errors) >= 2, timeout=10)
        assert client.errors[0]["status"] == 403 and client.errors[0]["code"] == "forbidden"
        assert client.state != "open"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
