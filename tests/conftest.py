"""Shared fixtures: settings on a throwaway SQLite file, a migrated store, the app."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import attrs
import pytest

from quartchat.broker.memory import MemoryBroker
from quartchat.config import Settings
from quartchat.hub import Hub
from quartchat.migrate import upgrade
from quartchat.store.database import DatabaseStore

from .fakes import Client
from .mysql import mysql_server_url, mysql_url  # noqa: F401 (fixtures, found here by pytest)

# Every test gets a hard time limit (pytest-timeout); awaits inside tests carry their own.
TIMEOUT = 5.0
# pytest-timeout does not cover pytest-asyncio's event-loop teardown, where a
# task that ignores cancellation hangs the run for good (a CI run once hung
# there for 90 minutes). This watchdog covers a test's whole protocol (setup,
# call, every teardown): past it, all threads' stacks are dumped and the run
# exits at once, failed.
HARD_LIMIT_S = 300


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    watchdog = threading.Timer(HARD_LIMIT_S, _hung, args=(item,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def _hung(item: pytest.Item) -> None:
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)  # write to the real stderr
    print(
        f"\n{item.nodeid}: still running after {HARD_LIMIT_S} s, outside pytest-timeout's reach; "
        "every thread's stack follows, then the run stops, failed",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(3)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = sqlite_url(tmp_path / "chat.db")
    upgrade(url)
    return url


@pytest.fixture
def sync_sql(db_url: str) -> Callable[[str], Any]:
    """Run one SQL statement on the test's database, around the store (as an operator would)."""
    import sqlite3

    path = db_url[len("sqlite+aiosqlite:///") :]

    async def run(sql: str) -> None:
        def call() -> None:
            with sqlite3.connect(path, timeout=10) as conn:
                conn.execute(sql)

        await asyncio.to_thread(call)

    return run


@pytest.fixture(params=["sqlite", "mysql"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each backend (the store's contract and property tests)."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'contract.db'}"
        upgrade(url)
        return url
    return str(request.getfixturevalue("mysql_url"))


@pytest.fixture
def make_settings(db_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base = Settings.from_env(
            {"QUARTCHAT_DATABASE_URL": db_url, "QUARTCHAT_SERVER_ID": "test-1"}, env_file=None
        )
        return attrs.evolve(base, **overrides)

    return make


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[DatabaseStore]:
    s = DatabaseStore(db_url)
    await s.connect()
    try:
        yield s
    finally:
        await s.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll a condition (a state reached by other tasks) with a deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture
async def make_hub(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Start real hubs (memory broker unless given, a DatabaseStore subclass of the
    test's choosing) and fake-socket clients on them; everything stops afterwards."""
    hubs: list[Hub] = []
    clients: list[Client] = []

    async def make(
        *, store_cls: type[DatabaseStore] = DatabaseStore, broker: Any = None, **overrides: Any
    ) -> tuple[Hub, Callable[..., Client]]:
        settings = make_settings(**overrides)
        hub = Hub(
            settings,
            store=store_cls(settings.database_url),
            broker=broker if broker is not None else MemoryBroker(),
        )
        await hub.start()
        hubs.append(hub)
        counter = iter(range(10_000))

        def client(sender: str, **kw: Any) -> Client:
            c = Client(sender, f"c{next(counter)}", **kw)
            clients.append(c)
            hub.connected(c.conn)
            return c

        return hub, client

    yield make
    for c in clients:
        await c.aclose()
    for hub in hubs:
        for c in clients:
            hub.disconnected(c.conn)
        await hub.stop()  # a no-op for a hub the test stopped itself


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Generator[Any, None, None]:
    """A 3-master Redis Cluster (6 processes on free ports) shared by the tests that only
    use it; fault tests start their own (tests/redis_cluster_util.py)."""
    from .redis_cluster_util import RedisClusterServers

    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield servers.start()
    finally:
        servers.close()
