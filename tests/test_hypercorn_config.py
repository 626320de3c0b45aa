"""hypercorn settings: package defaults, file overrides, and the ping-task release."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from quartchat import cli
from quartchat.config import Settings
from quartchat.errors import ConfigError
from quartchat.server import CONFIG_ENV, HYPERCORN_DEFAULTS, hypercorn_config
from quartchat.wsping import cancel_ping_tasks, ping_task_code

from .wsframes import masked, read_frame

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env({}, env_file=None)


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    return tmp_path


def test_defaults_are_the_production_settings_anywhere(empty_cwd: Path, settings: Settings) -> None:
    config = hypercorn_config(settings)
    assert config.backlog == 4096
    assert config.graceful_timeout == 3.0  # hypercorn's own default is 10
    assert config.websocket_ping_interval == 20.0
    assert config.keep_alive_timeout == 60.0
    assert config.websocket_max_message_size >= 16 * settings.frame_limit
    assert isinstance(config.accesslog, logging.Logger)
    assert config.bind == [settings.bind]
    assert config.workers == 1


def test_the_repository_example_matches_the_defaults() -> None:
    """hypercorn.toml documents the defaults: same keys, same values."""
    example = tomllib.loads((ROOT / "hypercorn.toml").read_text())
    assert example == HYPERCORN_DEFAULTS


def test_a_local_hypercorn_toml_overrides_only_what_it_names(
    empty_cwd: Path, settings: Settings
) -> None:
    (empty_cwd / "hypercorn.toml").write_text("graceful_timeout = 7\naccesslog = ''\n")
    config = hypercorn_config(settings)
    assert config.graceful_timeout == 7
    assert config.accesslog is None
    assert config.backlog == 4096 and config.websocket_ping_interval == 20.0


def test_the_named_file_wins_over_the_local_one(
    empty_cwd: Path,
    tmp_path_factory: pytest.TempPathFactory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (empty_cwd / "hypercorn.toml").write_text("backlog = 10\n")
    named = tmp_path_factory.mktemp("etc") / "hc.toml"
    named.write_text("backlog = 20\n")
    monkeypatch.setenv(CONFIG_ENV, str(named))
    assert hypercorn_config(settings).backlog == 20


def test_the_setting_may_come_from_a_dot_env_file(empty_cwd: Path, settings: Settings) -> None:
    (empty_cwd / "etc").mkdir()
    (empty_cwd / "etc" / "hc.toml").write_text("backlog = 30\n")
    (empty_cwd / ".env").write_text(f"{CONFIG_ENV}=etc/hc.toml\n")
    assert hypercorn_config(settings).backlog == 30


def test_a_named_file_that_does_not_exist_is_a_config_error(
    empty_cwd: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(empty_cwd / "missing.toml"))
    with pytest.raises(ConfigError, match=CONFIG_ENV):
        hypercorn_config(settings)
    monkeypatch.setenv("QUARTCHAT_DATABASE_URL", f"sqlite+aiosqlite:///{empty_cwd}/x.db")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert f"{CONFIG_ENV}={empty_cwd / 'missing.toml'}: no such file" in err
    assert not (empty_cwd / "x.db").exists(), "stopped before the migrations"


def test_a_broken_file_is_a_config_error(empty_cwd: Path, settings: Settings) -> None:
    (empty_cwd / "hypercorn.toml").write_text("backlog = [\n")
    with pytest.raises(ConfigError, match="cannot read"):
        hypercorn_config(settings)


async def test_the_pinned_hypercorn_ping_task_is_found_and_cancelled() -> None:
    """Runs hypercorn's own ping loop on a stand-in stream, as after a socket closed."""
    from hypercorn.protocol.ws_stream import WSStream

    assert ping_task_code() is WSStream._send_pings.__code__

    async def no_send(_event: object) -> None:
        return None

    stream = SimpleNamespace(
        closed=False,
        config=SimpleNamespace(websocket_ping_interval=60.0),
        context=SimpleNamespace(sleep=asyncio.sleep),
        _send_wsproto_event=no_send,
    )
    pinger = asyncio.create_task(WSStream._send_pings(stream))  # type: ignore[arg-type]
    bystander = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)  # both now sleep
    try:
        assert cancel_ping_tasks() == 1
        with pytest.raises(asyncio.CancelledError):
            await pinger
        assert not bystander.done()
    finally:
        bystander.cancel()
        await asyncio.gather(bystander, return_exceptions=True)


@pytest.mark.parametrize(("level", "logged"), [(logging.INFO, True), (logging.WARNING, False)])
def test_access_line_fields_are_gathered_only_when_the_line_is_logged(
    empty_cwd: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    level: int,
    logged: bool,
) -> None:
    """hypercorn's own Logger builds every field of an access line (headers, os.environ)
    before the level is looked at; at QUARTCHAT_LOG_LEVEL=warning ours builds none."""
    config = hypercorn_config(settings)
    access = logging.getLogger("hypercorn.access")
    monkeypatch.setattr(access, "level", access.level)  # restored after the test
    access.setLevel(level)  # (setLevel also clears the logger's isEnabledFor cache)
    built: list[object] = []
    real_atoms = config.log.atoms

    def atoms(*args: object) -> object:
        built.append(args)
        return real_atoms(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(config.log, "atoms", atoms)
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/chat",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    asyncio.run(config.log.access(scope, {"status": 101, "headers": []}, 0.001))  # type: ignore[arg-type]
    access.setLevel(logging.NOTSET)
    assert bool(built) is logged


async def test_one_pinger_task_pings_every_socket_and_forgets_closed_ones() -> None:
    """hypercorn would run one ping task per WebSocket; with wsping installed one task per
    process pings them all, each about once per interval, and holds none once closed."""
    import gc

    from quartchat import wsping

    assert wsping.install()
    interval = 0.4

    async def pings(reader: asyncio.StreamReader, seconds: float) -> int:
        n = 0
        try:
            async with asyncio.timeout(seconds):
                while True:
                    opcode, _ = await read_frame(reader)
                    n += opcode == 0x9
        except TimeoutError:
            return n

    async with _hypercorn(websocket_ping_interval=interval) as port:
        sockets = [await _open(port, websocket=True) for _ in range(30)]
        pinger = wsping.pinger_for(interval)
        assert len(pinger) == 30
        code = wsping.ping_task_code()
        assert not [
            t for t in asyncio.all_tasks() if getattr(t.get_coro(), "cr_code", None) is code
        ]
        counts = await asyncio.gather(*(pings(r, 5 * interval) for r, _ in sockets))
        assert all(3 <= n <= 6 for n in counts), counts  # about one per interval each
        for _, writer in sockets:
            writer.transport.abort()
        # Forgotten as each stream closes (no collection needed: a closed stream in a
        # cycle would wait for the collector), and the task ends at its next tick.
        gc.disable()
        try:
            async with asyncio.timeout(5):
                while len(pinger) or pinger._task is None or not pinger._task.done():
                    await asyncio.sleep(0.05)
        finally:
            gc.enable()


def test_statsd_keeps_hypercorns_statsd_logger(empty_cwd: Path, settings: Settings) -> None:
    """hypercorn swaps in its StatsdLogger only while logger_class is its own Logger."""
    from hypercorn.statsd import StatsdLogger

    (empty_cwd / "hypercorn.toml").write_text('statsd_host = "127.0.0.1:8125"\n')
    config = hypercorn_config(settings)
    config.set_statsd_logger_class(StatsdLogger)
    assert config.logger_class is StatsdLogger


async def test_a_closed_connection_is_freed_without_the_collector() -> None:
    """hypercorn's TCPServer and its protocol and task group refer to each other; with
    tcpfree installed a closed connection (a WebSocket or a plain request) is freed by
    reference counting, so no TCPServer waits for a collection."""
    import gc

    from hypercorn.asyncio.tcp_server import TCPServer

    from quartchat import tcpfree

    assert tcpfree.install() and tcpfree.installed()

    def servers() -> int:
        return sum(isinstance(o, TCPServer) for o in gc.get_objects())

    async with _hypercorn() as port:
        gc.collect()
        gc.disable()
        try:
            sockets = [(await _open(port, websocket=bool(n % 4)))[1] for n in range(20)]
            assert servers() >= 15  # the open WebSockets (a plain request may be over already)
            for writer in sockets:
                writer.transport.abort()
            del sockets, writer
            async with asyncio.timeout(5):
                while servers():
                    await asyncio.sleep(0.05)
        finally:
            gc.enable()


async def test_leansocket_finds_what_it_slims_and_the_socket_still_works() -> None:
    """With leansocket installed an open WebSocket keeps no asyncio.Queue, no Event deque,
    no h11 state machine after its 101 and no empty deques in wsproto or the stream; and
    it still echoes, in order, also a burst larger than hypercorn's app queue (10 events),
    and a plain request is still answered."""
    import collections
    import gc

    from hypercorn.asyncio.tcp_server import TCPServer

    from quartchat import leansocket

    assert leansocket.install() and leansocket.installed()
    async with _hypercorn() as port:
        reader, writer = await _open(port, websocket=True)
        await _open(port, websocket=False)  # answered: h11 is untouched for plain requests
        servers = [o for o in gc.get_objects() if isinstance(o, TCPServer)]
        upgraded = [s for s in servers if getattr(s.protocol.protocol, "stream", None)]
        upgraded = [s for s in upgraded if s.protocol.protocol.stream.scope["type"] == "websocket"]
        assert len(upgraded) == 1
        server = upgraded[0]
        h11_protocol = server.protocol.protocol
        stream = h11_protocol.stream
        assert isinstance(h11_protocol.can_read, leansocket.LeanEvent)
        assert isinstance(stream.app_put.__self__, leansocket.AppQueue)
        assert h11_protocol.connection.h11_connection is leansocket._UPGRADED
        assert isinstance(stream.connection._events, leansocket.SmallFifo)
        assert type(server.writer._protocol._drain_waiters) is list
        assert not any(
            type(r) is collections.deque
            for o in (h11_protocol, stream, stream.connection, server.writer._protocol)
            for r in gc.get_referents(o.__dict__ if hasattr(o, "__dict__") else o)
        )
        burst = [f"m{n}" for n in range(40)]
        writer.write(b"".join(masked(0x1, text.encode()) for text in burst))
        echoed = [await _next_text(reader) for _ in burst]
        assert echoed == burst
        writer.transport.abort()


async def _next_text(reader: asyncio.StreamReader) -> str:
    """The next text frame's text, skipping pings."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == 0x1:
            return payload.decode()


@contextlib.asynccontextmanager
async def _hypercorn(**options: Any) -> AsyncIterator[int]:
    """A Quart app on hypercorn in this loop, ``options`` set on its Config; yields the
    port. ``/ws`` accepts and echoes until the client goes; ``/`` answers "ok"."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from quart import Quart, websocket

    from .servers import free_port

    app = Quart(__name__)

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        while True:
            await websocket.send(await websocket.receive())  # an echo

    @app.route("/")
    async def index() -> str:
        return "ok"

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1
    for name, value in options.items():
        setattr(config, name, value)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(server, 5)


async def _open(port: int, *, websocket: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to :func:`_hypercorn`'s server, upgraded to a WebSocket (101) or with
    one plain request answered (200, ``Connection: close``)."""
    for _ in range(200):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.02)
    else:
        raise AssertionError("the server did not start")
    if websocket:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
    else:
        request = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    status = b"HTTP/1.1 101" if websocket else b"HTTP/1.1 200"
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(status)
    return reader, writer
