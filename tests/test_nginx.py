"""ops/nginx.conf in front of two real `quartchat serve` processes.

A copy of the config is rendered for loopback (the two upstream servers become
the test's servers, `listen 80` a free port, temp paths under tmp_path) and a
real nginx serves it: WebSocket clients through it reach both servers and talk
across them, /metrics is not public, and a rolling restart of both servers
under traffic loses nothing and closes every socket with 1001.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import orjson
import pytest

from .cluster import Cluster, eventually, summary
from .servers import ROOT, ChatClient, ReliableClient, ServerProcess, check_room, free_port

NGINX_CONF = ROOT / "ops" / "nginx.conf"
QUERY_SECRET = "eyJhbGciOiJIUzI1NiJ9.querytokenmarker.c2lnbmF0dXJl"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if found is None:
        raise AssertionError("nginx is not installed; run `bash ops/ensure-services.sh`")
    return found


def test_access_log_format_drops_query_strings_and_credentials() -> None:
    """The access log must not write `/chat?token=...` (auth mode jwt) or a bearer header."""
    text = NGINX_CONF.read_text()
    formats = re.findall(r"log_format\s+\S+\s+((?:'[^']*'\s*)+);", text)
    assert formats, "ops/nginx.conf defines a log_format"
    for fmt in formats:
        for leaky in (
            "$request ",
            '$request"',
            "$request_uri",
            "$args",
            "$query_string",
            "$arg_",
            "$http_authorization",
            "$is_args",
        ):
            assert leaky not in fmt, f"log_format writes {leaky.strip()}"
    for line in re.findall(r"^\s*access_log\s+([^;]+);", text, flags=re.MULTILINE):
        assert line.split()[0] == "off" or line.split()[-1] == "quartchat", line


def render_conf(upstreams: list[int], listen_port: int, prefix: Path) -> str:
    """ops/nginx.conf for loopback: upstream appN:8080 -> 127.0.0.1:PORT, listen 80 ->
    127.0.0.1:listen_port, temp paths under ``prefix``."""
    text = NGINX_CONF.read_text()

    def upstream(match: re.Match[str]) -> str:
        return f"{match.group(1)}server 127.0.0.1:{upstreams[int(match.group(2)) - 1]}"

    names = set(re.findall(r"^\s*server\s+app(\d+):8080\b", text, flags=re.MULTILINE))
    assert names == {str(i + 1) for i in range(len(upstreams))}, (
        f"expected upstream servers app1..app{len(upstreams)}:8080, found {sorted(names)}"
    )
    text = re.sub(r"^(\s*)server\s+app(\d+):8080\b", upstream, text, flags=re.MULTILINE)
    text, n = re.subn(
        r"^(\s*)listen\s+80\s*;", rf"\1listen 127.0.0.1:{listen_port};", text, flags=re.MULTILINE
    )
    assert n == 1, "expected one `listen 80;` line"
    temp = "".join(f"    {d}_temp_path {prefix / 'temp' / d};\n" for d in TEMP_DIRS)
    text, n = re.subn(
        r"^http\s*\{\n", lambda m: m.group(0) + temp, text, count=1, flags=re.MULTILINE
    )
    assert n == 1, "expected an `http {` block"
    return text


class Nginx:
    """A real nginx in the foreground, with its own prefix, pid, logs and temp dirs."""

    def __init__(self, prefix: Path, upstreams: list[int]) -> None:
        self.prefix = prefix
        self.port = free_port()
        (prefix / "temp").mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(render_conf(upstreams, self.port, prefix))
        self.log_path = prefix / "nginx.log"
        # The master runs as root here; the default worker user could not enter tmp_path.
        user = " user root;" if os.geteuid() == 0 else ""
        self.cmd = [
            nginx_binary(),
            "-p",
            f"{prefix}/",
            "-c",
            str(self.conf),
            "-e",
            str(prefix / "error.log"),
            "-g",
            f"daemon off; pid {prefix / 'nginx.pid'};{user}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/chat"

    def start(self, timeout: float = 10.0) -> Nginx:
        check = subprocess.run([*self.cmd, "-t"], capture_output=True, check=False, timeout=30)
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr.decode()}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.http + "/nginx-health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer /nginx-health:\n{self.log()}")

    def log(self) -> str:
        parts = []
        for path in (self.log_path, self.prefix / "error.log"):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def chat_statuses(self) -> dict[int, int]:
        """How many /chat handshakes got each status (from the access log)."""
        counts: dict[int, int] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = re.search(r'"GET /chat\S* HTTP/[\d.]+" (\d{3}) ', line)
            if match:
                counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
        return counts

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # fast shutdown: master stops its workers
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Cluster, Nginx]]:
    cluster = Cluster(tmp_path)
    nginx: Nginx | None = None
    try:
        servers = cluster.start(2, workers=2)
        nginx = Nginx(tmp_path / "nginx", [s.port for s in servers]).start()
        yield cluster, nginx
    except BaseException:
        print(cluster.logs())
        if nginx is not None:
            print(nginx.log())
        raise
    finally:
        if nginx is not None:
            nginx.stop()
        cluster.close()


def server_of(client: ChatClient) -> str:
    return next(f["server_id"] for f in client.frames if f["type"] == "welcome")


@pytest.mark.timeout(90)
async def test_websockets_through_nginx_reach_both_servers_and_talk_across(
    stack: tuple[Cluster, Nginx],
) -> None:
    _cluster, nginx = stack
    room = "via-nginx"
    clients = [await ChatClient(nginx.url, f"c{i}").connect() for i in range(6)]
    # A query-string token (auth mode jwt) must never reach nginx's access log.
    clients.append(await ChatClient(nginx.url, f"c6&token={QUERY_SECRET}").connect())
    clients[-1].sender = "c6"
    try:
        by_server: dict[str, list[ChatClient]] = {}
        for c in clients:
            by_server.setdefault(server_of(c), []).append(c)
        print("nginx: clients per server:", {k: len(v) for k, v in by_server.items()})
        assert set(by_server) == {"server0", "server1"}, "nginx spreads sockets over both servers"
        for c in clients:
            await c.join(room)
        # One post from a client of each server reaches everyone, on both servers.
        senders = [by_server["server0"][0], by_server["server1"][0]]
        for i, sender in enumerate(senders):
            await sender.send(
                {
                    "action": "message",
                    "room_id": room,
                    "content": f"hello {i}",
                    "client_msg_id": f"x{i}",
                }
            )
        for c in clients:
            await c.wait_for(lambda c=c: len(c.of("message", room)) == 2)
        orders = {tuple(f["seq"] for f in c.of("message", room)) for c in clients}
        assert orders == {(1, 2)}, "same order on every client of either server"
        for sender in senders:
            await sender.wait_for(lambda s=sender: bool(s.of("ack")))

        # Cluster-wide presence, read through nginx (either server answers).
        def members() -> tuple[int, object]:
            status, body = nginx.get(f"/api/rooms/{room}/members")
            return status, orjson.loads(body).get("members") if status == 200 else body

        await eventually(members, (200, sorted(c.sender for c in clients)))
        status, body = nginx.get("/readyz")
        assert status == 200 and orjson.loads(body)["status"] == "ready"
        # A refused handshake comes back through nginx as the server's own answer.
        status, body = nginx.get("/chat")  # no upgrade, no sender_id
        assert status in (400, 404, 405, 426), status
        nginx.get(f"/api/rooms?token={QUERY_SECRET}")
    finally:
        for c in clients:
            await c.close()
    # nginx logs a WebSocket when it ends: wait for the seven handshakes' lines.
    deadline = time.monotonic() + 10
    while nginx.chat_statuses().get(101, 0) < len(clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    access = nginx.log_path.read_text(errors="replace")
    assert nginx.chat_statuses().get(101, 0) == len(clients), access[-2000:]
    assert QUERY_SECRET not in access, "nginx logged a query-string token"
    assert "querytokenmarker" not in access


@pytest.mark.timeout(90)
def test_metrics_not_public_health_is(stack: tuple[Cluster, Nginx]) -> None:
    cluster, nginx = stack
    for path in ("/metrics", "/metrics/", "/metrics?x=1"):
        status, _ = nginx.get(path)
        assert status in (403, 404), f"{path} through nginx answered {status}"
    # The servers do serve it (Prometheus scrapes them directly).
    with urllib.request.urlopen(cluster.servers[0].http + "/metrics", timeout=5) as r:
        assert r.status == 200 and b"quartchat_" in r.read()
    status, body = nginx.get("/healthz")
    assert status == 200 and orjson.loads(body)["status"] == "ok"
    status, body = nginx.get("/nginx-health")
    assert status == 200 and body.strip() == b"ok"
    status, body = nginx.get("/")
    assert status == 200 and orjson.loads(body)["service"] == "quartchat"


class TimedClient(ReliableClient):
    """A ReliableClient that records how long each reconnect (through nginx) took."""

    def __init__(self, urls: list[str], sender: str, room: str) -> None:
        super().__init__(urls, sender, room)
        self.reconnect_s: list[float] = []

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await super()._reconnect()
        self.reconnect_s.append(loop.time() - started)


def restart(server: ServerProcess, nginx: Nginx, timings: dict[str, float]) -> None:
    """SIGTERM (graceful drain), wait for the exit, start again on the same port, then
    wait until nginx routes HTTP to it again: the step a rolling restart waits for
    before it stops the next server (nginx leaves a server that failed out of the
    HTTP group for fail_timeout after its last failure, which can be just before
    it started listening)."""
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait(30)
    assert code == 0, f"{server.name} exited {code} after SIGTERM:\n{server.log()}"
    t1 = time.monotonic()
    server.start()
    t2 = time.monotonic()
    deadline = t2 + 15
    while time.monotonic() < deadline:
        status, body = nginx.get("/")
        if status == 200 and orjson.loads(body)["server_id"] == server.name:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"nginx does not route to {server.name} after its restart")
    timings[f"{server.name} drain+exit"] = round(t1 - t0, 2)
    timings[f"{server.name} start"] = round(t2 - t1, 2)
    timings[f"{server.name} back in nginx"] = round(time.monotonic() - t2, 2)


class HttpPoller:
    """GET a path through nginx every few ms in a thread; counts the answers."""

    def __init__(self, nginx: Nginx, path: str) -> None:
        self.nginx = nginx
        self.path = path
        self.statuses: dict[int | str, int] = {}
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status: int | str = self.nginx.get(self.path)[0]
            except OSError as exc:
                status = type(exc).__name__
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self._stop.wait(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.mark.timeout(120)
async def test_rolling_restart_through_nginx_loses_nothing(stack: tuple[Cluster, Nginx]) -> None:
    cluster, nginx = stack
    a, b = cluster.servers
    room = "rolling"
    members = [TimedClient([nginx.url], f"r{i}", room) for i in range(6)]
    for m in members:
        await m.connect()
    try:
        first = {server_of(m.client) for m in members if m.client is not None}
        assert first == {"server0", "server1"}, f"members start on both servers: {first}"
        timings: dict[str, float] = {}

        def rolling() -> None:
            time.sleep(1.0)
            restart(a, nginx, timings)
            time.sleep(1.0)
            restart(b, nginx, timings)

        loop = asyncio.get_running_loop()
        # About 6 x 8 posts/s for ~21 s: traffic runs through both restarts (~13 s each).
        deadline = loop.time() + 60
        with HttpPoller(nginx, "/healthz") as http:
            runs = [asyncio.create_task(m.run(170, rate=8, deadline=deadline)) for m in members]
            restarts = asyncio.create_task(asyncio.to_thread(rolling))
            await asyncio.gather(*runs, restarts)
        stored = cluster.stored(room)
        for m in members:
            await m.settle(max(stored))
        report = check_room(members, stored)
        codes = [code for m in members for code in m.close_codes]
        waits = [w for m in members for w in m.reconnect_s]
        handshakes = nginx.chat_statuses()
        print("rolling restart through nginx:", summary(report))
        print(
            f"rolling restart: reconnects={sum(m.reconnects for m in members)} "
            f"close_codes={sorted(set(codes))} ({len(codes)} closes) "
            f"longest reconnect={max(waits):.2f}s failed /chat handshakes="
            f"{sum(n for st, n in handshakes.items() if st != 101)} "
            f"/healthz during restarts={http.statuses} (slowest {http.slowest:.2f}s) "
            f"timings={timings}"
        )
        assert report["lost"] == 0
        assert report["duplicates"] == 0
        assert report["out_of_order"] == 0
        assert report["missing"] == 0
        assert report["acked"] == report["sent"] == report["stored"]
        # Every member was on a server that was stopped, at least once.
        assert all(m.reconnects >= 1 for m in members), [m.reconnects for m in members]
        assert codes and all(code == 1001 for code in codes), f"close codes seen: {codes}"
        # nginx moved every handshake and request to the server that was up: no
        # 502 ("no live upstreams") although one server was up at every moment.
        assert set(handshakes) <= {101}, f"/chat handshakes through nginx: {handshakes}"
        assert set(http.statuses) == {200}, f"/healthz through nginx: {http.statuses}"
        assert max(waits) < 10, f"a reconnect through nginx took {max(waits):.1f}s"
    finally:
        for m in members:
            await m.close()
    # Both servers take new sockets through nginx again.
    seen: set[str] = set()
    deadline = time.monotonic() + 10
    while seen != {"server0", "server1"} and time.monotonic() < deadline:
        late = await ChatClient(nginx.url, "late").connect()
        seen.add(server_of(late))
        await late.close()
    assert seen == {"server0", "server1"}, f"after the restarts nginx reaches only {seen}"
