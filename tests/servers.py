"""Real `quartchat serve` processes and real WebSocket clients, for end-to-end tests."""

from __future__ import annotations

import asyncio
import itertools
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

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        *,
        port: int | None = None,
        workers: int = 1,
        name: str = "server",
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.workers = workers
        self.name = name
        self.env = {
            **os.environ,
            **env,
            "QUARTCHAT_HYPERCORN_CONFIG": str(ROOT / "hypercorn.toml"),
            "QUARTCHAT_SERVER_ID": env.get("QUARTCHAT_SERVER_ID", name),
        }
        self.log_path = workdir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/chat"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "quartchat",
                    "serve",
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "--workers",
                    str(self.workers),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
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
        self.ws = await websockets.connect(
            self.url, ping_interval=None, compression=None, open_timeout=10
        )
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
        return [
            f
            for f in self.frames
            if f["type"] == type_ and (room is None or f.get("room_id") == room)
        ]

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


# What a failed reconnect raises: refused or cut (OSError, websockets'), or closed
# before the join was answered (ChatClient.wait_for's AssertionError).
RECONNECT_ERRORS = (OSError, websockets.WebSocketException, AssertionError)


class ReliableClient:
    """A client that follows the README's recipe: retry unacked posts with the same
    client_msg_id, and on any disconnect reconnect (to the next URL) and rejoin
    with since_seq. Records what it sent, what was acked and what it received."""

    def __init__(self, urls: list[str], sender: str, room: str) -> None:
        self.urls = urls
        self.url_index = 0
        self.sender = sender
        self.room = room
        self.client: ChatClient | None = None
        self.received: list[dict[str, Any]] = []  # message frames, in arrival order
        self.acked: dict[str, dict[str, Any]] = {}  # client_msg_id -> ack
        self.pending: dict[str, str] = {}  # client_msg_id -> content, not yet acked
        self.sent = 0
        self.reconnects = 0
        self.close_codes: list[int | None] = []
        self._seen_frames = 0

    @property
    def last_seq(self) -> int:
        return self.received[-1]["seq"] if self.received else 0

    async def connect(self, since_seq: int | None = None) -> None:
        url = self.urls[self.url_index % len(self.urls)]
        self.client = await ChatClient(url, self.sender).connect()
        self._seen_frames = 0
        if since_seq is None:
            await self.client.join(self.room)
        else:
            await self.client.join(self.room, since_seq=since_seq)

    def _absorb(self) -> None:
        """Move new frames of the current connection into the records."""
        assert self.client is not None
        frames = self.client.frames
        while self._seen_frames < len(frames):
            f = frames[self._seen_frames]
            self._seen_frames += 1
            if f["type"] == "message" and f["room_id"] == self.room:
                self.received.append(f)
            elif f["type"] == "ack":
                self.acked[f["client_msg_id"]] = f
                self.pending.pop(f["client_msg_id"], None)

    async def _reconnect(self) -> None:
        assert self.client is not None
        self.close_codes.append(self.client.close_code)
        await self.client.close()
        self.url_index += 1
        self.reconnects += 1
        while True:
            try:
                await self.connect(since_seq=self.last_seq)
                return
            except RECONNECT_ERRORS:
                self.url_index += 1
                await asyncio.sleep(0.2)

    async def run(self, count: int, *, rate: float, deadline: float) -> None:
        """Post ``count`` messages at about ``rate``/s; keep going until all are acked."""
        loop = asyncio.get_running_loop()
        next_send = loop.time()
        retry_at = loop.time() + 1.0
        while loop.time() < deadline:
            assert self.client is not None
            self._absorb()
            if self.client.closed:
                await self._reconnect()
                for cmid, content in list(self.pending.items()):
                    await self._post(cmid, content)
                retry_at = loop.time() + 1.0
                continue
            now = loop.time()
            if self.sent < count and now >= next_send:
                cmid = f"{self.sender}-{self.sent}"
                content = f"{self.sender} #{self.sent}"
                self.pending[cmid] = content
                self.sent += 1
                next_send = now + 1.0 / rate
                await self._post(cmid, content)
            elif self.sent >= count and not self.pending:
                return
            if now >= retry_at:
                # Unacked for a second (an `unavailable` error, or a lost frame): resend.
                for cmid, content in list(self.pending.items()):
                    await self._post(cmid, content)
                retry_at = now + 1.0
            await asyncio.sleep(0.005)
        raise AssertionError(f"{self.sender}: {len(self.pending)} posts never acked")

    async def _post(self, cmid: str, content: str) -> None:
        assert self.client is not None
        try:
            await self.client.send(
                {
                    "action": "message",
                    "room_id": self.room,
                    "content": content,
                    "client_msg_id": cmid,
                }
            )
        except websockets.ConnectionClosed:
            pass  # closed: the run loop reconnects and resends

    async def settle(self, expected_last_seq: int, timeout: float = 20.0) -> None:
        """Wait until this member has received up to ``expected_last_seq``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.last_seq < expected_last_seq:
            assert self.client is not None
            self._absorb()
            if self.client.closed:
                await self._reconnect()
            if loop.time() > deadline:
                raise AssertionError(
                    f"{self.sender}: at seq {self.last_seq}, expected {expected_last_seq}"
                )
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def check_room(members: list[ReliableClient], stored: dict[int, str]) -> dict[str, Any]:
    """Guarantees 1-4 over what every member saw and what the store holds."""
    acked = {cmid: ack for m in members for cmid, ack in m.acked.items()}
    lost = [a for a in acked.values() if stored.get(a["seq"]) != a["id"]]
    report: dict[str, Any] = {
        "sent": sum(m.sent for m in members),
        "acked": len(acked),
        "stored": len(stored),
        "lost": len(lost),
        "delivered": {},
        "out_of_order": 0,
        "duplicates": 0,
        "missing": 0,
    }
    all_seqs = sorted(stored)
    for m in members:
        seqs = [f["seq"] for f in m.received]
        report["delivered"][m.sender] = len(seqs)
        report["duplicates"] += len(seqs) - len(set(seqs))
        report["out_of_order"] += sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
        report["missing"] += len(set(all_seqs) - set(seqs))
        # Same message for the same seq everywhere.
        for f in m.received:
            assert stored.get(f["seq"]) == f["id"], f"{m.sender} got seq {f['seq']} not as stored"
    return report
