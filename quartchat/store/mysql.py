"""The MySQL/MariaDB dialect (aiomysql's pool): row locks, writes side by side, the append
in two multi-statement round trips (:mod:`.multi`); see :mod:`.dialect` for what a
dialect owns."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

from . import multi
from .dialect import Dialect, Query
from .driver import Connection, Driver

__all__ = ["MysqlDialect"]

_MYSQL_RETRYABLE = frozenset({1213, 1205})  # deadlock, lock wait timeout

# aiomysql turns the server's note on every INSERT IGNORE that finds its room
# row already there into a Python warning on stderr: expected, not a problem.
warnings.filterwarnings("ignore", message=r".*Duplicate entry", module=r"aiomysql\.cursors")


class MysqlDialect(Dialect):
    """MySQL/MariaDB through aiomysql's pool: row locks, writes run side by side.

    An append is two round trips of multi-statement queries (:mod:`.multi`):
    ``BEGIN``, the counters' ``FOR UPDATE``, the retry probe; then the
    multi-row ``INSERT``, one counter ``UPDATE`` per room, ``COMMIT``. A probe
    that finds a stored copy costs one round trip more, for the full rows.

    The connections allow multi-statement queries (``CLIENT.MULTI_STATEMENTS``,
    which aiomysql 0.3.2 sets anyway), so an SQL injection could run any
    statement it likes: every value in every statement must be a parameter,
    escaped by pymysql (``cursor.mogrify``), never text built into the SQL
    (only placeholder counts are formatted in).
    """

    mark = "%s"
    insert_ignore = "INSERT IGNORE"
    # Row-locks the counters in key order, so two servers' groups never deadlock.
    row_lock = " FOR UPDATE"
    upsert_last_seen = "ON DUPLICATE KEY UPDATE last_seen = VALUES(last_seen)"
    # A post arriving while one append commits starts its own transaction (its
    # rooms are other rooms, locked in key order; InnoDB merges the two fsyncs).
    concurrent_appends = 2

    def __init__(self, url: str, *, connect_timeout: float) -> None:
        super().__init__(
            Driver(
                url,
                charset="utf8mb4",
                connect_timeout=connect_timeout,
                minsize=1,
                maxsize=10,
                pool_recycle=3600,
                client_flag=multi.MULTI_STATEMENTS,  # for the append's batches
            )
        )

    def datetime_param(self, dt: datetime) -> Any:
        return dt

    async def fetch(self, raw: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with raw.cursor() as cursor:
            await cursor.execute(sql, tuple(params))
            return list(await cursor.fetchall())

    async def execute_many(self, raw: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        # pymysql sends one multi-row INSERT.
        async with raw.cursor() as cursor:
            await cursor.executemany(sql, [tuple(r) for r in rows])

    async def begin(self, raw: Any) -> None:
        await raw.begin()

    async def begin_append(
        self, raw: Any, rooms: Sequence[str], retries: Query | None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        # One round trip. The server runs a batch's statements one after the
        # other, so the retry lookup (a statement of its own after the FOR
        # UPDATE) starts only once the counters' locks are granted: no other
        # writer can store a copy of a retry in between. The lookup also runs
        # when a room has no counter row; it only reads.
        statements: list[Query] = [("BEGIN", ()), (self.lock_counters(len(rooms)), rooms)]
        if retries is not None:
            statements.append(retries)
        async with raw.cursor() as cursor:
            results = await multi.run(cursor, [cursor.mogrify(q, tuple(p)) for q, p in statements])
        return results[1], (results[2] if retries is not None else [])

    async def commit_append(
        self, raw: Any, inserts: Sequence[Sequence[Any]], counters: Sequence[tuple[int, str]]
    ) -> None:
        # One round trip (more only past multi.QUERY_BYTES): the multi-row INSERT,
        # one UPDATE per room, COMMIT. Its caller acks only after the COMMIT's own
        # result was read without error.
        async with raw.cursor() as cursor:
            texts = multi.insert_rows(cursor, self.insert_messages, inserts) if inserts else []
            texts += [cursor.mogrify(self.update_counter, tuple(c)) for c in counters]
            texts.append("COMMIT")
            await multi.run(cursor, texts)

    async def acquire(self, stack: AsyncExitStack) -> Connection:
        return await self.driver.acquire()

    async def give_back(self, conn: Connection) -> None:
        await self.driver.release(conn)

    async def discard(self, conn: Connection) -> None:
        # Close the socket now; the pool then forgets the connection.
        self.driver.raw(conn).close()
        await self.driver.release(conn, quietly=True)

    # pymysql's errors (aiomysql raises them) are told by name and module:
    # pymysql has no type stubs to import them with.

    def is_duplicate(self, exc: BaseException) -> bool:
        return _is_pymysql(exc) and type(exc).__name__ == "IntegrityError"

    def retryable(self, exc: BaseException) -> bool:
        # 1213 (deadlock) and 1205 (lock wait timeout): the server rolled back
        # the whole transaction.
        cause = exc.__cause__
        return (
            cause is not None
            and _is_pymysql(cause)
            and bool(cause.args)
            and cause.args[0] in _MYSQL_RETRYABLE
        )


def _is_pymysql(exc: BaseException) -> bool:
    return type(exc).__module__.partition(".")[0] == "pymysql"
