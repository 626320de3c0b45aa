"""The direct write path: prepared frames straight to hypercorn's transport.

- ``prepare`` builds exactly the bytes wsproto (the slow path's frame builder)
  builds for the same text, for every length class of the header;
- on a real hypercorn socket the direct path is found (so a hypercorn upgrade
  that moves its internals fails here instead of silently losing the path),
  and declines when permessage-deflate was negotiated;
- a socket that moves between the direct path and the queued path (its
  reader stalls, the transport buffer fills, then it reads again) receives
  every frame once, in the order sent, byte for byte: asserted over random
  interleavings of sends, stalls and reads (hypothesis).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Quart, websocket
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import Message
from wsproto.extensions import PerMessageDeflate

from quartchat import metrics
from quartchat.connection import Connection
from quartchat.errors import CloseCode
from quartchat.fastsend import decline_compression, fast_sender_for, prepare

from .servers import ServerProcess, free_port
from .wsframes import masked

# ---- the prepared bytes -----------------------------------------------------------------

LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def _wsproto_frame(text: str) -> bytes:
    ws = WsConnection(ConnectionType.SERVER, [PerMessageDeflate()])  # offered, not negotiated
    return bytes(ws.send(Message(data=text)))


def test_prepare_matches_wsproto_at_every_header_length() -> None:
    for n in LENGTHS:
        for char in ("x", "é", "😀"):
            text = char * (n // len(char.encode()))
            assert prepare(text) == _wsproto_frame(text), (n, char)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300) | st.text(min_size=100, max_size=200).map(lambda s: s * 400))
def test_prepare_matches_wsproto_for_any_text(text: str) -> None:
    assert prepare(text) == _wsproto_frame(text)


# ---- a real hypercorn server ------------------------------------------------------------


class Server:
    """A Quart app on hypercorn whose /ws socket is a quartchat Connection."""

    def __init__(self, *, compression: bool = True) -> None:
        self.port = free_port()
        self.conns: asyncio.Queue[tuple[Connection, Any]] = asyncio.Queue()
        app = Quart(__name__)

        @app.websocket("/ws")
        async def ws() -> None:
            sock = websocket._get_current_object()  # type: ignore[attr-defined]
            if not compression:
                assert decline_compression(sock)
            await websocket.accept()
            conn = Connection("c", "s", queue_size=100_000)
            fast = fast_sender_for(sock)
            writer = asyncio.create_task(conn.run_writer(sock, fast))
            await self.conns.put((conn, fast))
            try:
                while True:
                    await websocket.receive()  # until the client goes away
            finally:
                conn.close(CloseCode.NORMAL)
                await asyncio.wait([writer], timeout=5)

        self.app = app


@asynccontextmanager
async def serving(*, compression: bool = True) -> AsyncIterator[Server]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    server = Server(compression=compression)
    config = Config()
    config.bind = [f"127.0.0.1:{server.port}"]
    config.accesslog = None
    config.graceful_timeout = 1
    stop = asyncio.Event()
    task = asyncio.create_task(serve(server.app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        yield server
    finally:
        stop.set()
        await asyncio.wait([task], timeout=10)


async def handshake(
    port: int, *, deflate: bool = False, accepted: bool | None = None
) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{ext}\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert (b"permessage-deflate" in head.lower()) == (deflate if accepted is None else accepted)
    return reader, writer


def counts() -> tuple[float, float]:
    return metrics.FRAMES_DIRECT._value.get(), metrics.FRAMES_QUEUED._value.get()


async def test_the_direct_path_is_found_on_hypercorn_and_declines_deflate() -> None:
    async with serving() as server:
        _, plain = await handshake(server.port)
        _, fast = await asyncio.wait_for(server.conns.get(), 5)
        assert fast is not None and fast.direct() is not None
        _, deflated = await handshake(server.port, deflate=True)
        _, fast2 = await asyncio.wait_for(server.conns.get(), 5)
        assert fast2 is not None and fast2.direct() is None  # frames are compressed per socket
        for w in (plain, deflated):
            w.close()


async def test_declined_compression_keeps_a_browser_on_the_direct_path() -> None:
    async with serving(compression=False) as server:
        _, writer = await handshake(server.port, deflate=True, accepted=False)
        conn, fast = await asyncio.wait_for(server.conns.get(), 5)
        assert fast is not None and fast.direct() is not None
        async with asyncio.timeout(5):
            while True:  # once the writer task has started, frames go direct
                direct = counts()[0]
                assert conn.send("{}")
                if counts()[0] == direct + 1:
                    break
                await asyncio.sleep(0.01)
        writer.close()


# Steps: ("send" | "trickle", count, size) | ("stall",) | ("read", tenths of a ms) | ("yield",)
SIZE = st.sampled_from([3, 100, 2000, 40000])
SEND = st.tuples(st.sampled_from(["send", "trickle"]), st.integers(1, 40), SIZE)
STEP = SEND | st.tuples(st.just("stall")) | st.tuples(st.just("read"), st.integers(1, 600))
STEP = STEP | st.tuples(st.just("yield"))


async def run_steps(server: Server, steps: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
    reader, writer = await handshake(server.port)
    conn, fast = await asyncio.wait_for(server.conns.get(), 5)
    assert fast is not None
    sent: list[str] = []
    got = bytearray()
    reading = asyncio.Event()
    reading.set()
    done = asyncio.Event()

    async def client() -> None:
        while not done.is_set() or len(got) < expected_len():
            await reading.wait()
            chunk = await reader.read(65536)
            if not chunk:
                return
            got.extend(chunk)

    def expected_len() -> int:
        return sum(len(prepare(f)) for f in sent)

    task = asyncio.create_task(client())
    before = counts()
    delivered_direct = 0
    n = 0
    for step in steps:
        if step[0] in ("send", "trickle"):  # a burst, or one frame per loop iteration
            for _ in range(step[1]):
                if step[0] == "trickle":
                    await asyncio.sleep(0)
                frame = f'{{"n":{n},"pad":"{"x" * step[2]}"}}'
                n += 1
                sent.append(frame)
                if n % 3 == 0:  # also the room fan-out's entry point, one run per call
                    # (its caller, the room, counts its direct frames for every socket)
                    sent_now, written = conn.deliver([frame], 0, lambda _start, f=frame: prepare(f))
                    assert sent_now == 1
                    delivered_direct += written
                else:
                    assert conn.send(frame)
        elif step[0] == "stall":
            reading.clear()
        elif step[0] == "read":  # the client reads for a while, then goes on as it was
            stalled = not reading.is_set()
            reading.set()
            await asyncio.sleep(step[1] / 10000)
            if stalled:
                reading.clear()
        else:
            await asyncio.sleep(0.001)
    reading.set()
    done.set()
    async with asyncio.timeout(30):
        while len(got) < expected_len():
            await asyncio.sleep(0.005)
    assert bytes(got) == b"".join(prepare(f) for f in sent)  # every frame once, in order
    writer.write(masked(0x8, struct.pack("!H", 1000)))
    writer.close()
    task.cancel()
    await asyncio.wait([task])
    after = counts()
    return int(after[0] - before[0]) + delivered_direct, int(after[1] - before[1])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_frames_arrive_in_order_whichever_path_each_takes(steps: list[tuple[Any, ...]]) -> None:
    async def main() -> None:
        async with serving() as server:
            await run_steps(server, steps)

    asyncio.run(main())


async def test_a_socket_moves_from_direct_to_queued_and_back() -> None:
    steps: list[tuple[Any, ...]] = [("send", 5, 100), ("stall",)]
    steps += [("send", 40, 40000)] * 10  # 16 MB while the client reads nothing
    steps += [("read", 2), ("send", 5, 100), ("yield",)] * 3
    steps += [("trickle", 40, 40000), ("read", 5)] * 5  # sends as the buffer drains
    async with serving() as server:
        direct, queued = await run_steps(server, steps)
        assert direct > 5 and queued > 0, (direct, queued)
        # Once the queue has drained, frames take the direct path again.
        reader, writer = await handshake(server.port)
        conn, _ = await asyncio.wait_for(server.conns.get(), 5)
        async with asyncio.timeout(5):
            while conn.queued:
                await asyncio.sleep(0.01)
        d0, _ = counts()
        assert conn.send('{"after":"drain"}')
        assert counts()[0] == d0 + 1
        assert await reader.readexactly(len(prepare('{"after":"drain"}'))) == prepare(
            '{"after":"drain"}'
        )
        writer.close()


# ---- the same, with a transport whose buffer and drain the test controls -----------------


class FakeTransport:
    """A transport whose write-buffer size and drain are set by the test."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.size = 0
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.unlocked = asyncio.Event()  # hypercorn's send lock, held by another sender
        self.unlocked.set()

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16 * 1024, 64 * 1024)


class FakeStream:
    """What FastSender and DirectWriter read of hypercorn's WSStream; ``send``
    writes like TCPServer.protocol_send (write, then wait for the drain)."""

    def __init__(self, transport: FakeTransport) -> None:
        from hypercorn.protocol.ws_stream import ASGIWebsocketState

        self.transport = transport
        self.connection = WsConnection(ConnectionType.SERVER)
        self.stream_id = 1
        self.closed = False
        self.state = ASGIWebsocketState.CONNECTED

    async def send(self, event: Any) -> None:
        await self.transport.unlocked.wait()
        self.transport.write(event.data)
        await self.transport.resumed.wait()


def fake_fast_path() -> tuple[Any, FakeTransport]:
    from hypercorn.protocol.events import Data
    from hypercorn.protocol.ws_stream import ASGIWebsocketState
    from wsproto.connection import ConnectionState
    from wsproto.utilities import LocalProtocolError

    from quartchat.fastsend import DirectWriter, FastSender

    transport = FakeTransport()
    stream = FakeStream(transport)
    fast = FastSender(
        stream,
        Message,
        Data,
        ASGIWebsocketState.CONNECTED,
        ConnectionState.OPEN,
        LocalProtocolError,
    )
    direct = DirectWriter(stream, transport, ASGIWebsocketState.CONNECTED, ConnectionState.OPEN)
    fast.direct = lambda: direct  # type: ignore[method-assign]
    return fast, transport


class _Unused:
    async def send(self, data: str) -> None:
        raise AssertionError("the fast path never uses Quart's send")

    async def close(self, code: int, reason: str = "") -> None:
        return None


# fill: over the high-water mark and the drain waits; ping: the same, and hypercorn's send
# lock is held by another sender (its ping) waiting for that drain; window: under the mark
# but the drain still waits (asyncio resumes at the low-water mark); drain: empty, resumed.
BUFFER_STEP = st.sampled_from(["fill", "ping", "window", "drain", "yield"])
SEND_STEP = st.tuples(st.sampled_from(["send", "deliver"]), st.integers(1, 5))


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(BUFFER_STEP | SEND_STEP, min_size=1, max_size=40))
def test_no_frame_overtakes_a_queued_one(steps: list[Any]) -> None:
    async def main() -> None:
        fast, transport = fake_fast_path()
        conn = Connection("c", "s", queue_size=100_000)
        writer = asyncio.create_task(conn.run_writer(_Unused(), fast))
        await asyncio.sleep(0)
        sent: list[str] = []
        for step in steps:
            if step in ("fill", "ping"):
                transport.size = 10**6
                transport.resumed.clear()
                if step == "ping":
                    transport.unlocked.clear()
            elif step == "window":
                transport.size = 20 * 1024
            elif step == "drain":
                transport.size = 0
                transport.resumed.set()
                transport.unlocked.set()
            elif step == "yield":
                await asyncio.sleep(0)
            else:
                run = [f'{{"n":{len(sent) + i}}}' for i in range(step[1])]
                sent += run
                if step[0] == "send":
                    assert all(conn.send(frame) for frame in run)
                else:
                    joined = b"".join(prepare(f) for f in run)
                    assert conn.deliver(run, 0, lambda _start, j=joined: j)[0] == len(run)
        transport.size = 0
        transport.resumed.set()
        transport.unlocked.set()
        expected = b"".join(prepare(f) for f in sent)
        async with asyncio.timeout(5):
            while len(transport.data) < len(expected):
                await asyncio.sleep(0)
        assert bytes(transport.data) == expected
        for _ in range(3):
            await asyncio.sleep(0)
        assert not conn.writing  # nothing queued: no writer task
        conn.close(CloseCode.NORMAL)
        await asyncio.wait([writer], timeout=5)

    asyncio.run(main())


async def test_a_writer_task_runs_only_while_frames_are_queued_or_the_close_is_sent() -> None:
    """... and only then does the connection hold a deque of its own (760 bytes even
    empty): an idle one shares the one empty queue."""
    fast, transport = fake_fast_path()
    conn = Connection("c", "s", queue_size=100)
    shared = Connection("other", "s", queue_size=1)._frames
    assert conn._frames is shared and not shared
    ended: list[bool] = []

    class Closing(_Unused):
        closed: tuple[int, str] | None = None

        async def close(self, code: int, reason: str = "") -> None:
            self.closed = (code, reason)

    ws = Closing()
    conn.attach(ws, fast, on_end=ended.append)
    assert conn.send('{"n":0}') and not conn.writing  # the direct path
    transport.size = 10**6  # the reader is behind: over the high-water mark
    transport.resumed.clear()
    assert conn.send('{"n":1}') and conn.send('{"n":2}')
    assert conn.writing and conn.queued == 2 and conn._frames is not shared
    await asyncio.sleep(0)
    transport.size = 0
    transport.resumed.set()
    async with asyncio.timeout(5):
        while conn.writing:
            await asyncio.sleep(0)
    assert bytes(transport.data) == b"".join(prepare(f'{{"n":{i}}}') for i in range(3))
    assert conn._frames is shared and not shared  # its deque went with the writer
    assert conn.send('{"n":3}') and not conn.writing  # direct again
    assert not ended
    conn.close(CloseCode.GOING_AWAY, "bye")
    assert conn.writing  # a writer sends the close
    async with asyncio.timeout(5):
        await conn.wait_closed()
    assert ws.closed == (1001, "bye") and ended == [False] and not conn.writing
    await conn.detach()


async def test_a_failed_send_ends_the_writing_and_tells_the_session() -> None:
    conn = Connection("c", "s", queue_size=100)
    ended: list[bool] = []

    class Broken(_Unused):
        async def send(self, data: str) -> None:
            raise ConnectionResetError("gone")

    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        conn.attach(Broken(), None, on_end=ended.append)
        conn.send('{"n":0}')
        async with asyncio.timeout(5):
            await conn.wait_closed()
        assert ended == [True] and not conn.writing
        await conn.detach()
        gc.collect()  # a task whose exception nobody read reports it when freed
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not unretrieved, unretrieved


async def test_a_writer_cancelled_before_it_ran_is_forgotten() -> None:
    """A frame queued just before the session's cleanup detaches: the writer task is
    cancelled before its first step, and the connection no longer counts it."""
    fast, transport = fake_fast_path()
    conn = Connection("c", "s", queue_size=100)
    conn.attach(_Unused(), fast)
    transport.size = 10**6  # the direct path declines: the frame is queued
    assert conn.send('{"n":0}') and conn.writing
    await conn.detach()  # in the same loop turn
    assert not conn.writing


# ---- what `quartchat serve` answers a browser's deflate offer ------------------------------


async def _offer_deflate(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /chat?sender_id=alice HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 101"), head
    return head.lower()


async def test_serve_declines_deflate_unless_ws_compression_is_on(tmp_path: Path) -> None:
    for setting, accepted in (({}, False), ({"QUARTCHAT_WS_COMPRESSION": "true"}, True)):
        env = {"QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db", **setting}
        srv = ServerProcess(tmp_path, env, name=f"compression-{accepted}").start()
        try:
            head = await _offer_deflate(srv.port)
            assert (b"sec-websocket-extensions: permessage-deflate" in head) == accepted, head
        finally:
            srv.stop()
