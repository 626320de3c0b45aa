"""Redis for tests: the shared server (by URL, own key prefix) or a throwaway one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import redis

from .servers import free_port

REDIS_URL = os.environ.get("QUARTCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_prefix() -> str:
    return f"qctest-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_shared_redis() -> None:
    """Fail (not skip) when the shared Redis cannot be reached."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        raise AssertionError(
            f"Redis at {REDIS_URL} is not reachable ({exc}); run `bash ops/ensure-services.sh` "
            "or set QUARTCHAT_TEST_REDIS_URL"
        ) from exc


def drop_prefix(prefix: str) -> None:
    """Delete this test's keys (only keys under its own prefix)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys: list[bytes] = []
        # Plain names, and the hash-tagged `{prefix:room}:...` / `{prefix}:...` ones.
        for pattern in (f"{prefix}:*", f"{{{prefix}:*", f"{{{prefix}}}:*"):
            keys += client.scan_iter(match=pattern, count=1000)
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RedisServer:
    """A redis-server of the test's own, on a free port; can be killed and restarted empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (ops/ensure-services.sh installs it)"
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Come back empty on the same port (nothing was saved)."""
        self.kill()
        self.start()
