"""Shared fixtures: settings on a throwaway SQLite file, a migrated store, the app."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from quartchat.config import Settings
from quartchat.migrate import upgrade
from quartchat.store.database import DatabaseStore

# Every test gets a hard time limit (pytest-timeout); awaits inside tests carry their own.
TIMEOUT = 5.0


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = sqlite_url(tmp_path / "chat.db")
    upgrade(url)
    return url


@pytest.fixture
def make_settings(db_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base = Settings.from_env({"QUARTCHAT_DATABASE_URL": db_url, "QUARTCHAT_SERVER_ID": "test-1"},
                                 env_file=None)
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
