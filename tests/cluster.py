"""Several real `quartchat serve` processes sharing Redis and a MariaDB database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy.engine import make_url

from .mysql import create_database, drop_database
from .redis_util import REDIS_URL, check_shared_redis, drop_prefix, unique_prefix
from .servers import ServerProcess


class Cluster:
    """N servers x W workers on one Redis (own prefix) and one MariaDB database (own name)."""

    def __init__(
        self,
        workdir: Path,
        *,
        redis_url: str | None = None,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        if redis_url is None:
            check_shared_redis()
        self.redis_url = redis_url or REDIS_URL
        self.prefix = unique_prefix()
        self.database_url = database_url or create_database()
        self._own_database = database_url is None
        self.db_for_checks = self.database_url
        self.extra_env = extra_env or {}
        self.servers: list[ServerProcess] = []

    def env(self, database_url: str | None = None) -> dict[str, str]:
        return {
            "QUARTCHAT_DATABASE_URL": database_url or self.database_url,
            "QUARTCHAT_BROKER_URL": self.redis_url,
            "QUARTCHAT_REDIS_PREFIX": self.prefix,
            "QUARTCHAT_RATE_PER_S": "0",
            "QUARTCHAT_GAP_TIMEOUT_S": "0.1",
            "QUARTCHAT_SKIP_TIMEOUT_S": "2",
            **self.extra_env,
        }

    def start(
        self, count: int, *, workers: int = 2, database_url: str | None = None
    ) -> list[ServerProcess]:
        started = []
        for i in range(count):
            s = ServerProcess(
                self.workdir,
                self.env(database_url),
                workers=workers,
                name=f"server{len(self.servers)}",
            )
            self.servers.append(s)
            started.append(s.start())
        return started

    def stored(self, room: str) -> dict[int, str]:
        url = make_url(self.db_for_checks)
        conn = pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            password=url.password or "",
            database=url.database,
            connect_timeout=5,
        )
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT seq, id FROM messages WHERE room_id = %s", (room,))
                return {int(seq): mid for seq, mid in cur.fetchall()}
        finally:
            conn.close()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log()}" for s in self.servers)

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        if self._own_database:
            drop_database(self.database_url)
        if self.redis_url == REDIS_URL:
            drop_prefix(self.prefix)


def summary(report: dict[str, Any]) -> str:
    return (
        "sent={sent} acked={acked} stored={stored} lost={lost} duplicates={duplicates} "
        "out_of_order={out_of_order} missing={missing} delivered={delivered}"
    ).format(**report)


async def eventually(fetch: Callable[[], Any], expected: Any, timeout: float = 5.0) -> None:
    """Presence is applied in the background (a join never waits for Redis): poll
    ``fetch()`` until it equals ``expected``; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(fetch)
        if got == expected:
            return
        assert time.monotonic() < deadline, f"{got!r} != {expected!r} after {timeout:g} s"
        await asyncio.sleep(0.05)
