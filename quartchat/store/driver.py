"""The one adapter over ``databases``' internals: every use of its private parts is here.

Checked against ``databases`` 0.9.0 (pinned in ``pyproject.toml``), whose
source shows why its public API is not enough for the store:

- ``Database.connection()`` (and so ``Database.fetch_*``, ``execute*`` and
  ``transaction()``) hands out one ``Connection`` per asyncio task, kept in
  ``Database._connection_map``. When an operation fails on a dead connection,
  ``Connection.__aexit__`` calls ``release()``, which fails too, and never
  reaches ``self._database._connection = None``: the task keeps the dead
  connection for good (every later call in it fails with "Not connected"),
  and the aiomysql pool never gets the slot back. Nor can a ``Connection`` be
  closed instead of given back. So the store takes a connection of its own
  per operation from the backend (``Database._backend.connection()``, a
  ``databases.interfaces.ConnectionBackend``) and gives it back, or closes it,
  itself.
- ``Database.disconnect()`` waits for every connection in use; when that
  times out only the aiomysql pool (``MySQLBackend._pool``) can drop them
  (``Pool.terminate()``).

The public parts of ``ConnectionBackend`` (``acquire``, ``release``,
``raw_connection``) are used as documented. :func:`shape_problems` lists what
of the above is missing from the installed version; :class:`Driver` refuses to
start on a version that lacks it, and a test runs it, so an upgrade of
``databases`` cannot break the store silently.
"""

from __future__ import annotations

import logging
from typing import Any

import databases
from databases import Database
from databases.interfaces import ConnectionBackend

__all__ = ["CHECKED_VERSION", "Connection", "Driver", "shape_problems"]

log = logging.getLogger(__name__)

CHECKED_VERSION = "0.9.0"

Connection = ConnectionBackend
"""A driver connection taken for one operation (``acquire``, ``release``, ``raw_connection``)."""


class Driver:
    """A ``databases.Database`` and the connections the store takes from it one by one."""

    def __init__(self, url: str, **options: Any) -> None:
        self._db = Database(url, **options)
        problems = shape_problems(self._db)
        if problems:
            raise RuntimeError(
                f"databases {databases.__version__} is not shaped like {CHECKED_VERSION}, "
                f"which quartchat.store.driver was checked against: {'; '.join(problems)}"
            )

    @property
    def is_connected(self) -> bool:
        return bool(self._db.is_connected)

    async def connect(self) -> None:
        await self._db.connect()

    async def disconnect(self) -> None:
        """Close the pool; waits for every connection still in use."""
        if self._db.is_connected:
            await self._db.disconnect()

    async def acquire(self) -> Connection:
        """A new connection of the caller's own, bound to no task (see the module docstring)."""
        conn: Connection = self._db._backend.connection()
        await conn.acquire()
        return conn

    @staticmethod
    def raw(conn: Connection) -> Any:
        """The driver's own connection (an ``aiosqlite`` or ``aiomysql`` one)."""
        return conn.raw_connection

    @staticmethod
    async def release(conn: Connection, *, quietly: bool = False) -> None:
        """Give the connection back to the backend; ``quietly``: one already broken."""
        try:
            await conn.release()
        except Exception:
            if not quietly:
                raise
            log.debug("releasing a broken connection failed", exc_info=True)

    def terminate(self) -> None:
        """Drop the connections still in use (aiomysql's pool; SQLite has none to drop)."""
        pool = getattr(self._db._backend, "_pool", None)
        if pool is not None and hasattr(pool, "terminate"):
            pool.terminate()


def shape_problems(db: Database) -> list[str]:
    """What this module relies on and ``db`` (of the installed ``databases``) lacks."""
    problems = []
    backend = getattr(db, "_backend", None)
    if backend is None:
        return ["Database has no _backend"]
    if not callable(getattr(backend, "connection", None)):
        problems.append(f"{type(backend).__name__} has no connection()")
    if backend.__class__.__name__ == "MySQLBackend" and not hasattr(backend, "_pool"):
        problems.append("MySQLBackend has no _pool")
    for name in ("acquire", "release", "raw_connection"):
        if not hasattr(ConnectionBackend, name):
            problems.append(f"ConnectionBackend has no {name}")
    return problems
