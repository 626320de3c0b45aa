"""The store's adapter over ``databases``' internals (:mod:`quartchat.store.driver`) and
its dialects: an upgrade of ``databases`` that changes what the adapter reaches into
fails here, loudly, before it can break the store silently."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomysql
import databases
import pymysql
import pymysql.constants.CLIENT
import pytest
from databases import Database
from databases.backends.mysql import MySQLBackend, MySQLConnection
from databases.backends.sqlite import SQLiteBackend, SQLiteConnection

from quartchat.migrate import upgrade
from quartchat.store import StoreError, multi
from quartchat.store.database import DatabaseStore
from quartchat.store.dialect import dialect_for
from quartchat.store.driver import CHECKED_VERSION, Driver, shape_problems
from quartchat.store.mysql import MysqlDialect
from quartchat.store.sqlite import SqliteDialect

T = 5.0


def test_databases_is_the_version_the_adapter_was_checked_against() -> None:
    assert databases.__version__ == CHECKED_VERSION, (
        f"databases is {databases.__version__}: read quartchat/store/driver.py against its "
        f"source (it uses Database._backend, backend.connection(), MySQLBackend._pool), "
        f"then move CHECKED_VERSION"
    )


@pytest.mark.parametrize(
    ("url", "backend", "connection"),
    [
        ("sqlite+aiosqlite:///unused.db", SQLiteBackend, SQLiteConnection),
        ("mysql+aiomysql://u:p@127.0.0.1:1/db", MySQLBackend, MySQLConnection),
    ],
)
def test_the_internals_the_adapter_uses_are_there(
    url: str, backend: type, connection: type
) -> None:
    db = Database(url)
    assert shape_problems(db) == []
    assert isinstance(db._backend, backend)
    assert isinstance(db._backend.connection(), connection)
    for name in ("acquire", "release", "raw_connection"):
        assert name in vars(connection), f"{connection.__name__}.{name} is inherited or gone"
    if backend is MySQLBackend:
        assert db._backend._pool is None  # set by connect(), an aiomysql Pool
        assert callable(aiomysql.Pool.terminate)


def test_a_databases_without_them_is_refused() -> None:
    class Bare:
        pass

    assert shape_problems(Bare()) == ["Database has no _backend"]  # type: ignore[arg-type]


async def test_sqlite_connections_from_the_adapter(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    driver = Driver(url)
    await asyncio.wait_for(driver.connect(), T)
    try:
        assert driver.is_connected
        conns = [await asyncio.wait_for(driver.acquire(), T) for _ in range(2)]
        raws = [driver.raw(c) for c in conns]
        assert raws[0] is not raws[1]  # one of its own each, even in one task
        async with raws[0].execute("SELECT 1") as cursor:
            assert list(await cursor.fetchall()) == [(1,)]
        assert raws[0].in_transaction is False  # what the SQLite pool checks
        for conn in conns:
            await asyncio.wait_for(driver.release(conn), T)
        await driver.release(conns[0], quietly=True)  # released twice: logged, not raised
        with pytest.raises(AssertionError):
            await driver.release(conns[0])
    finally:
        await asyncio.wait_for(driver.disconnect(), T)
    assert not driver.is_connected


async def test_mysql_terminate_drops_connections_in_use(mysql_url: str) -> None:
    driver = Driver(mysql_url)
    await asyncio.wait_for(driver.connect(), T)
    try:
        conn = await asyncio.wait_for(driver.acquire(), T)
        raw = driver.raw(conn)
        assert not raw.closed
        driver.terminate()
        assert raw.closed
    finally:
        await asyncio.wait_for(driver.disconnect(), T)


def test_dialects_are_chosen_by_url() -> None:
    assert isinstance(dialect_for("sqlite+aiosqlite:///x.db", connect_timeout=1), SqliteDialect)
    mysql = dialect_for("mysql+aiomysql://u:p@127.0.0.1:1/db", connect_timeout=1)
    assert isinstance(mysql, MysqlDialect)
    assert mysql.lock_counters(2).endswith("ORDER BY room_id FOR UPDATE")
    assert "INSERT IGNORE INTO rooms" in mysql.insert_rooms
    sqlite = dialect_for("sqlite+aiosqlite:///x.db", connect_timeout=1)
    assert sqlite.lock_counters(2).endswith("ORDER BY room_id")
    assert "INSERT OR IGNORE INTO rooms" in sqlite.insert_rooms


def _caused_by(cause: BaseException) -> StoreError:
    try:
        raise StoreError(f"insert: {cause}") from cause
    except StoreError as exc:
        return exc


def test_only_mysql_deadlocks_are_retried() -> None:
    mysql = MysqlDialect("mysql+aiomysql://u:p@127.0.0.1:1/db", connect_timeout=1)
    deadlock = pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
    lock_wait = pymysql.err.OperationalError(1205, "Lock wait timeout exceeded")
    assert mysql.retryable(_caused_by(deadlock))
    assert mysql.retryable(_caused_by(lock_wait))
    assert not mysql.retryable(_caused_by(pymysql.err.OperationalError(2013, "Lost connection")))
    # A room named like an error code is not a deadlock (the message used to be searched).
    assert not mysql.retryable(StoreError("insert: no counter row for rooms ['r1213']"))
    assert mysql.is_duplicate(pymysql.err.IntegrityError(1062, "Duplicate entry"))
    assert not mysql.is_duplicate(deadlock)
    sqlite = SqliteDialect("sqlite+aiosqlite:///x.db")
    assert not sqlite.retryable(_caused_by(deadlock))


async def test_a_real_lock_wait_timeout_is_retryable(mysql_url: str) -> None:
    """What aiomysql really raises when a row lock is not granted is told apart."""
    holder, waiter = DatabaseStore(mysql_url), DatabaseStore(mysql_url)
    await asyncio.wait_for(holder.connect(), T)
    await asyncio.wait_for(waiter.connect(), T)
    d = holder.dialect
    try:
        async with asyncio.timeout(T), holder._session("hold", transaction=True) as raw:
            await d.execute_many(raw, d.insert_rooms, [("locked", d.timestamp(0))])
            await d.fetch(raw, d.lock_counters(1), ["locked"])
            with pytest.raises(StoreError) as info:
                async with waiter._session("wait", transaction=True) as other:
                    await d.fetch(other, "SET SESSION innodb_lock_wait_timeout = 1", ())
                    await d.fetch(other, d.lock_counters(1), ["locked"])
        assert waiter.dialect.retryable(info.value), info.value
    finally:
        await asyncio.wait_for(holder.close(), T)
        await asyncio.wait_for(waiter.close(), T)


def test_mysql_connections_allow_multi_statements() -> None:
    assert multi.MULTI_STATEMENTS == pymysql.constants.CLIENT.MULTI_STATEMENTS
    mysql = MysqlDialect("mysql+aiomysql://u:p@127.0.0.1:1/db", connect_timeout=1)
    options = mysql.driver._db._backend._get_connection_kwargs()
    assert options["client_flag"] & pymysql.constants.CLIENT.MULTI_STATEMENTS


async def test_every_result_set_of_a_batch_is_read(mysql_url: str) -> None:
    """:func:`multi.run` on a real connection: one result per statement, and an error
    in any statement raises, the last one's too (the COMMIT of an append)."""
    driver = Driver(mysql_url, client_flag=multi.MULTI_STATEMENTS)
    await asyncio.wait_for(driver.connect(), T)
    try:
        conn = await asyncio.wait_for(driver.acquire(), T)
        raw = driver.raw(conn)
        assert raw.client_flag & pymysql.constants.CLIENT.MULTI_STATEMENTS
        async with asyncio.timeout(T), raw.cursor() as cursor:
            texts = ["BEGIN", cursor.mogrify("SELECT %s, %s", ("a'; --", "100%")), "DO 1"]
            texts.append("COMMIT")
            assert await multi.run(cursor, texts) == [[], [("a'; --", "100%")], [], []]
            for bad in (1, 3):
                texts = ["SELECT 1", "SELECT 2", "SELECT 3"]
                texts[bad - 1] = "SELECT * FROM no_such_table"
                with pytest.raises(pymysql.err.ProgrammingError):
                    await multi.run(cursor, texts)
        await driver.release(conn, quietly=True)
    finally:
        await asyncio.wait_for(driver.disconnect(), T)


class _FakeCursor:
    """Result sets as a list; raises where one is an exception (as aiomysql does)."""

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.queries: list[str] = []

    def _next(self) -> None:
        current = self.results.pop(0)
        if isinstance(current, BaseException):
            raise current
        self.rows = current

    async def execute(self, query: str) -> None:
        self.queries.append(query)
        self._next()

    async def fetchall(self) -> list[Any]:
        return list(self.rows)

    async def nextset(self) -> bool | None:
        if not self.results or self.results[0] == "end":
            if self.results:
                self.results.pop(0)
            return None
        self._next()
        return True


async def test_a_failed_commit_in_a_batch_raises() -> None:
    commit_failed = pymysql.err.OperationalError(1180, "Got error during COMMIT")
    cursor = _FakeCursor([[], [], commit_failed])
    with pytest.raises(pymysql.err.OperationalError):
        await multi.run(cursor, ["INSERT x", "UPDATE y", "COMMIT"])
    assert cursor.queries == ["INSERT x; UPDATE y; COMMIT"]
    # Fewer results than statements is an error too, never an ack.
    with pytest.raises(RuntimeError, match="3 statements sent, 2 results read"):
        await multi.run(_FakeCursor([[], [], "end"]), ["INSERT x", "UPDATE y", "COMMIT"])


async def test_statements_are_packed_under_the_query_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multi, "QUERY_BYTES", 40)

    class Mogrify:
        def mogrify(self, sql: str, args: tuple[Any, ...]) -> str:
            return sql % tuple(repr(a) for a in args)

    sql = "INSERT INTO t (a, b) VALUES (%s, %s)"
    inserts = multi.insert_rows(Mogrify(), sql, [(1, "x"), (2, "y"), (3, "z")])
    assert inserts == [
        "INSERT INTO t (a, b) VALUES (1, 'x')",
        "INSERT INTO t (a, b) VALUES (2, 'y')",
        "INSERT INTO t (a, b) VALUES (3, 'z')",
    ]
    # Whole statements are packed into queries of at most QUERY_BYTES (one longer
    # statement goes alone), each result set still read.
    monkeypatch.setattr(multi, "QUERY_BYTES", 20)
    cursor = _FakeCursor([[], [], "end", [], "end", [(1,)], "end"])
    texts = ["BEGIN", "DO 1", "INSERT INTO t VALUES (1)", "SELECT 1"]
    assert await multi.run(cursor, texts) == [[], [], [], [(1,)]]
    assert cursor.queries == ["BEGIN; DO 1", "INSERT INTO t VALUES (1)", "SELECT 1"]
    monkeypatch.setattr(multi, "QUERY_BYTES", 50)
    assert multi.insert_rows(Mogrify(), sql, [(1, "x"), (2, "y"), (3, "z")]) == [
        "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y')",
        "INSERT INTO t (a, b) VALUES (3, 'z')",
    ]
