"""Real `quartchat serve` processes and real WebSocket clients, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import websockets

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One `quartchat serve` in its own process group, logging to a file."""

    def __init__(self, workdir: Path, env: dict[str, str], *, port: int | None = None,
                 workers: int = 1, name: str = "server") -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.workers = workers
        self.name = name
        self.env = {**os.environ, **env,
                    "QUARTCHAT_HYPERCORN_CONFIG": str(ROOT / "hypercorn.toml"),
                    "QUARTCHAT_SERVER_ID": env.get("QUARTCHAT_SERVER_ID", name)}
        self.log_path = workdir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/chat"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quartchat", "serve", "--bind", f"127.0.0.1:{self.port}",
             "--workers", str(self.workers)],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.http + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def signal(self, sig: int, group: bool = False) -> None:
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def http_get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=5) as r:
            return orjson.loads(r.read())


class ChatClient:
    """A real WebSocket client that records every frame it gets."""

    def __init__(self, url: str, sender: str) -> None:
        self.url = f"{url}?sender_id={sender}"
        self.sender = sender
        self.frames: list[dict[str, Any]] = []
        self.ws: Any = None
        self.close_code: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def connect(self) -> ChatClient:
        self.ws = await websockets.connect(self.url, ping_interval=None, compression=None,
                                           open_timeout=10)
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda: any(f["type"] == "welcome" for f in self.frames))
        return self

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(orjson.loads(raw))
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self._changed.set()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                if self.closed and not predicate():
                    raise AssertionError(f"{self.sender}: closed ({self.close_code}) while waiting")
                await self._changed.wait()

    @property
    def closed(self) -> bool:
        return self._reader is not None and self._reader.done()

    def of(self, type_: str, room: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == type_ and (room is None or f.get("room_id") == room)]

    async def join(self, room: str, **kw: Any) -> dict[str, Any]:
        n = len(self.of("joined", room))
        await self.send({"action": "join", "room_id": room, **kw})
        await self.wait_for(lambda: len(self.of("joined", room)) > n)
        return self.of("joined", room)[-1]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
