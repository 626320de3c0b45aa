"""Input that used to slip through (issue 9): echoing errors, full-match ids, bounded
integers, a writer that treats a closing socket as closed, one 4008 log line a second."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from quart import Quart
from quart.testing.connections import WebsocketResponseError

from quartchat import connection as connection_mod
from quartchat import metrics
from quartchat.app import create_app
from quartchat.config import Settings
from quartchat.connection import Connection
from quartchat.errors import ChatError, CloseCode, ConfigError
from quartchat.fastsend import fast_sender_for
from quartchat.protocol import Limits, parse_frame


async def _recv(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        return orjson.loads(await ws.receive())  # type: ignore[no-any-return]


@pytest.fixture
async def limited_app(make_settings: Callable[..., Settings]) -> AsyncIterator[Quart]:
    # A burst of 5 frames, then one a second: a pipelined batch is mostly refused.
    app = create_app(make_settings(rate_per_s=1, rate_burst=5, max_content=64))
    async with app.test_app():
        yield app


# ---- errors that say which request failed -------------------------------------------


async def test_pipelined_posts_past_the_rate_limit_each_error_names_its_post(
    limited_app: Quart,
) -> None:
    """Acceptance 3: every rate_limited error is matched to its post by client_msg_id."""
    async with limited_app.test_client().websocket("/chat?sender_id=alice") as ws:
        assert (await _recv(ws))["type"] == "welcome"
        await ws.send(orjson.dumps({"action": "join", "room_id": "r1"}).decode())
        assert (await _recv(ws))["type"] == "joined"
        ids = [f"post-{i}" for i in range(30)]
        for cmid in ids:  # pipelined: no wait between posts
            await ws.send(
                orjson.dumps(
                    {"action": "message", "room_id": "r1", "content": cmid, "client_msg_id": cmid}
                ).decode()
            )
        acked: set[str] = set()
        limited: list[dict[str, Any]] = []
        while len(acked) + len(limited) < len(ids):
            frame = await _recv(ws)
            if frame["type"] == "ack":
                acked.add(frame["client_msg_id"])
            elif frame["type"] == "error":
                limited.append(frame)
        assert limited, "the burst should have been exceeded"
        for error in limited:
            assert error["code"] == "rate_limited", error
            assert error.get("action") == "message" and error.get("room_id") == "r1", error
            assert error.get("client_msg_id") in ids, error
        limited_ids = [e["client_msg_id"] for e in limited]
        assert len(set(limited_ids)) == len(limited_ids)
        assert acked.isdisjoint(limited_ids) and acked | set(limited_ids) == set(ids)


async def test_refused_frames_echo_only_well_formed_fields(limited_app: Quart) -> None:
    settings: Settings = limited_app.config["QUARTCHAT_SETTINGS"]
    async with limited_app.test_client().websocket("/chat?sender_id=bob") as ws:
        assert (await _recv(ws))["type"] == "welcome"
        # A frame over the frame limit: too_large, still naming the post.
        big = {
            "action": "message",
            "room_id": "r1",
            "client_msg_id": "big-1",
            "content": "x" * (settings.frame_limit + 10),
        }
        await ws.send(orjson.dumps(big).decode())
        error = await _recv(ws)
        assert error["code"] == "too_large"
        assert (error.get("action"), error.get("room_id"), error.get("client_msg_id")) == (
            "message",
            "r1",
            "big-1",
        ), error
        for _ in range(10):  # spend the burst
            await ws.send('{"action": "ping"}')
        bad = [
            {"action": "message", "room_id": "r1\n", "client_msg_id": "c" * 65},
            {"action": "nope", "room_id": "r1"},
            "not json",
            ["a", "list"],
        ]
        for frame in bad:
            await ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())
        # One answer per frame, in order: 10 to the pings, then the four bad frames.
        answers = [await _recv(ws) for _ in range(10 + len(bad))]
        seen = answers[-len(bad) :]
        assert all(f["code"] == "rate_limited" for f in seen), seen
        assert seen[0].get("action") == "message"
        assert "room_id" not in seen[0] and "client_msg_id" not in seen[0], seen[0]
        for frame in seen[1:]:
            assert set(frame) == {"type", "code", "message"}, frame


# ---- ids validated with full matches ------------------------------------------------


@pytest.mark.parametrize("room", ["room\n", "room\r", "\nroom"])
def test_room_id_with_a_newline_is_invalid_field(room: str) -> None:
    for frame in (
        {"action": "join", "room_id": room},
        {"action": "message", "room_id": room, "content": "hi"},
    ):
        with pytest.raises(ChatError) as info:
            parse_frame(orjson.dumps(frame).decode(), Limits())
        assert info.value.code == "invalid_field"
        assert info.value.room_id is None  # not well formed: not echoed


async def test_handshake_sender_id_with_a_trailing_newline_is_400(limited_app: Quart) -> None:
    for query in ("sender_id=alice%0A", "sender_id=alice%0D", "sender_id=al%00ice"):
        with pytest.raises(WebsocketResponseError) as info:
            async with limited_app.test_client().websocket(f"/chat?{query}"):
                pass
        assert info.value.response.status_code == 400, query


async def test_http_room_id_with_a_newline_is_400(limited_app: Quart) -> None:
    client = limited_app.test_client()
    for path in ("/api/rooms/room%0A/messages", "/api/rooms/room%0A/members"):
        response = await client.get(path)
        assert response.status_code == 400, (path, await response.get_data())


def test_settings_ids_are_full_matches() -> None:
    for name, value in (
        ("QUARTCHAT_SERVER_ID", "srv\n"),
        ("QUARTCHAT_REDIS_PREFIX", "p\n"),
        ("QUARTCHAT_BIND", "127.0.0.1:80\n"),
    ):
        # Settings strip surrounding whitespace; an inner newline must still fail.
        with pytest.raises(ConfigError):
            Settings.from_env({name: value.replace("\n", "\nx")}, env_file=None)


# ---- numeric fields bounded to what every store accepts -----------------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"action": "history", "room_id": "r", "before_seq": 2**63},
        {"action": "history", "room_id": "r", "before_seq": 10**30},
        {"action": "join", "room_id": "r", "since_seq": 2**63},
        {"action": "join", "room_id": "r", "since_seq": 2**64 + 1},
        {"action": "history", "room_id": "r", "limit": 2**64},
        {"action": "join", "room_id": "r", "history": -1},
    ],
)
def test_out_of_range_integers_are_invalid_field(frame: dict[str, Any]) -> None:
    with pytest.raises(ChatError) as info:
        parse_frame(_dumps_big(frame), Limits())
    assert info.value.code == "invalid_field"
    assert info.value.action == frame["action"] and info.value.room_id == "r"


def _dumps_big(frame: dict[str, Any]) -> str:
    # orjson refuses ints past 64 bits; the stdlib writes them as a client would.
    import json

    return json.dumps(frame)


def test_largest_store_integer_is_accepted() -> None:
    command = parse_frame(
        _dumps_big({"action": "history", "room_id": "r", "before_seq": 2**63 - 1}), Limits()
    )
    assert command.before_seq == 2**63 - 1


async def test_http_before_seq_past_int64_is_400_not_503(limited_app: Quart) -> None:
    client = limited_app.test_client()
    for query in (
        "before_seq=9223372036854775808",
        "before_seq=99999999999999999999999",
        "limit=1_0",
        "limit=%2B5",
        "before_seq=%D9%A1",
    ):
        response = await client.get(f"/api/rooms/r1/messages?{query}")
        body = await response.get_json()
        assert response.status_code == 400 and body["error"] == "invalid_field", (query, body)
    response = await client.get("/api/rooms/r1/messages?before_seq=9223372036854775807")
    assert response.status_code == 200


async def test_websocket_history_before_seq_past_int64_is_invalid_field(limited_app: Quart) -> None:
    async with limited_app.test_client().websocket("/chat?sender_id=carol") as ws:
        assert (await _recv(ws))["type"] == "welcome"
        await ws.send('{"action": "history", "room_id": "r1", "before_seq": 9223372036854775808}')
        error = await _recv(ws)
        assert error["code"] == "invalid_field" and error["action"] == "history", error


# ---- a writer that treats a closing socket as closed --------------------------------


class _FakeQuartSocket:
    """Shaped like Quart's websocket over hypercorn: ``_send`` is a partial of the
    stream's ``app_send``, as :func:`fast_sender_for` expects."""

    def __init__(self, stream: Any) -> None:
        self._send = functools.partial(lambda app_send, message: app_send(message), stream.app_send)
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def send(self, data: str) -> None:
        self.sent.append(data)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


async def test_writer_survives_a_frame_to_a_socket_in_local_closing() -> None:
    from hypercorn.config import Config
    from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
    from wsproto import ConnectionType
    from wsproto.connection import Connection as WsConnection
    from wsproto.connection import ConnectionState
    from wsproto.events import CloseConnection

    async def send(_: Any) -> None:
        return None

    stream = WSStream(None, Config(), None, None, False, None, None, send, 1)  # type: ignore[arg-type]
    stream.state = ASGIWebsocketState.CONNECTED
    stream.connection = WsConnection(ConnectionType.SERVER)
    stream.connection.send(CloseConnection(code=1009))  # hypercorn's own "too big" close
    assert stream.connection.state == ConnectionState.LOCAL_CLOSING
    ws = _FakeQuartSocket(stream)
    fast = fast_sender_for(ws)
    assert fast is not None
    conn = Connection("c1", "alice", queue_size=16)
    writer = asyncio.create_task(conn.run_writer(ws, fast))
    conn.send('{"type": "presence"}')
    await asyncio.sleep(0)  # let the writer take the frame
    async with asyncio.timeout(5):
        while not ws.sent and not writer.done():
            await asyncio.sleep(0.01)
    assert not writer.done(), writer.exception()
    conn.close(CloseCode.NORMAL)
    async with asyncio.timeout(5):
        await writer  # no LocalProtocolError
    assert ws.closed == (1000, "")


# ---- no per-subscriber log line in fan-out --------------------------------------------


async def test_slow_consumer_closes_are_counted_and_summed_in_one_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = getattr(connection_mod, "SlowConsumerLog", None)
    if summary is not None:
        monkeypatch.setattr(connection_mod, "_SLOW_LOG", summary(0.3))
    before = metrics.SLOW_CONSUMER_CLOSES._value.get()
    caplog.set_level(logging.WARNING, logger="quartchat.connection")
    conns = [Connection(f"c{i}", f"s{i}", queue_size=1) for i in range(100)]
    for conn in conns:  # one fan-out pass: every queue overflows
        conn.send("a")
        conn.send("b")
    assert all(c.close_code == 4008 for c in conns)
    assert metrics.SLOW_CONSUMER_CLOSES._value.get() - before == 100
    lines = [r for r in caplog.records if r.name == "quartchat.connection"]
    assert len(lines) <= 1, f"{len(lines)} log lines for one fan-out pass"
    async with asyncio.timeout(5):  # the summary line follows within the interval
        while len([r for r in caplog.records if r.name == "quartchat.connection"]) < 2:
            await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "quartchat.connection"]
    assert len(lines) == 2 and "99 more" in lines[1], lines
