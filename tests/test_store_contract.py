"""One contract for every Store backend: SQLite (a temp file) and MariaDB/MySQL.

Every test taking ``store`` runs once per backend. The MariaDB-only tests at
the end put a :class:`tests.proxy.TcpProxy` between the store and the server
and cut (reset) or stall (black-hole) the connection under it.

Store calls are made from the test's own task, as a room's writer task makes
them (``databases`` binds connections to the calling task, which is where a
connection broken mid-transaction used to stay stuck), and every await is
bounded with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import aiomysql
import attrs
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from quartchat.migrate import sync_url
from quartchat.store import DuplicateError, NewMessage, StoredMessage, StoreError, multi
from quartchat.store.database import DatabaseStore
from quartchat.store.schema import metadata
from tests.mysql import with_host
from tests.proxy import TcpProxy, ThreadedProxy

T = 5.0  # bound of any single await in these tests
OP_TIMEOUT = 3.0  # the store's own bound, shorter than T so its StoreError shows first
BASE_MS = 1_795_000_000_123  # 2026-11-18T..., with milliseconds

R = TypeVar("R")


async def within(awaitable: Any, seconds: float = T) -> Any:
    """Await in the current task, at most ``seconds``."""
    async with asyncio.timeout(seconds):
        return await awaitable


def msg(
    room: str,
    seq: int,
    *,
    sender: str = "alice",
    cmid: str | None = None,
    content: str | None = None,
    ms: int | None = None,
) -> StoredMessage:
    return StoredMessage(
        room_id=room,
        seq=seq,
        id=uuid.uuid4().hex,
        sender_id=sender,
        content=f"message {seq} in {room}" if content is None else content,
        client_msg_id=cmid,
        sent_at_ms=BASE_MS + seq if ms is None else ms,
    )


def batch(room: str, lo: int, hi: int, **kw: Any) -> list[StoredMessage]:
    """Messages lo..hi inclusive."""
    return [msg(room, s, **kw) for s in range(lo, hi + 1)]


def seqs(rows: list[StoredMessage]) -> list[int]:
    return [r.seq for r in rows]


def new(row: StoredMessage) -> NewMessage:
    return NewMessage(row.id, row.sender_id, row.content, row.client_msg_id, row.sent_at_ms)


async def put(store: DatabaseStore, rows: list[StoredMessage]) -> None:
    """Append rows of one room, checking that the store gives them exactly their seqs."""
    answers = await store.append(rows[0].room_id, [new(r) for r in rows])
    assert [a.row for a in answers] == rows
    assert all(a.created for a in answers)


# -- backends -----------------------------------------------------------------------


async def _opened(url: str) -> AsyncIterator[DatabaseStore]:
    """A connected store for a fixture, closed (bounded) after the test."""
    s = DatabaseStore(url, op_timeout=OP_TIMEOUT)
    await within(s.connect())
    try:
        yield s
    finally:
        await within(s.close(), T + OP_TIMEOUT)


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[DatabaseStore]:
    async for s in _opened(backend_url):
        yield s


def _engine(url: str) -> sa.Engine:
    args: dict[str, Any] = (
        {"timeout": 5}
        if url.startswith("sqlite")
        else {"connect_timeout": 5, "read_timeout": 10, "write_timeout": 10}
    )
    return sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool, connect_args=args)


@pytest.fixture
def sync_db(backend_url: str) -> Iterator[Callable[..., Any]]:
    """Run ``fn(connection)`` on an independent synchronous connection, in a thread.

    Use as ``await within(sync_db(fn))``: checks go around the store under test.
    """
    yield from _sync_runner(backend_url)


def _sync_runner(url: str) -> Iterator[Callable[..., Any]]:
    """Yield ``run(fn)``: ``fn(connection)`` on a sync engine, in a thread, awaitable."""
    engine = _engine(url)

    def run(fn: Callable[[sa.Connection], R]) -> Any:
        def call() -> R:
            with engine.connect() as conn:
                return fn(conn)

        return asyncio.to_thread(call)

    yield run
    engine.dispose()


def _rows(conn: sa.Connection, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sa.text(sql), params)]


# -- the contract -------------------------------------------------------------------


async def test_ping(store: DatabaseStore) -> None:
    await within(store.ping())


async def test_max_seq_of_unused_room_is_zero(store: DatabaseStore) -> None:
    assert await within(store.max_seq("never-used")) == 0
    await within(put(store, batch("used", 1, 3)))
    assert await within(store.max_seq("never-used")) == 0
    assert await within(store.max_seq("used")) == 3


async def test_insert_then_after(store: DatabaseStore) -> None:
    rows = batch("r1", 1, 7, sender="bob")
    await within(put(store, rows))
    await within(put(store, batch("r2", 1, 2)))  # another room, same seqs

    assert await within(store.max_seq("r1")) == 7
    assert await within(store.after("r1", 0, None, 100)) == rows
    assert await within(store.after("r1", 2, 5, 100)) == rows[2:5]
    assert seqs(await within(store.after("r1", 0, None, 3))) == [1, 2, 3]
    assert seqs(await within(store.after("r1", 5, None, 100))) == [6, 7]
    assert await within(store.after("r1", 7, None, 100)) == []
    assert await within(store.after("r1", 3, 3, 100)) == []
    assert seqs(await within(store.after("r2", 0, None, 100))) == [1, 2]


async def test_page(store: DatabaseStore) -> None:
    rows = batch("r", 1, 7)
    await within(put(store, rows))

    page, more = await within(store.page("r", None, 3))
    assert (seqs(page), more) == ([5, 6, 7], True)  # newest page, oldest first
    assert page == rows[4:7]
    page, more = await within(store.page("r", 5, 3))
    assert (seqs(page), more) == ([2, 3, 4], True)
    page, more = await within(store.page("r", 2, 3))
    assert (seqs(page), more) == ([1], False)
    page, more = await within(store.page("r", 4, 3))
    assert (seqs(page), more) == ([1, 2, 3], False)  # exactly the rest: no more
    page, more = await within(store.page("r", None, 7))
    assert (seqs(page), more) == ([1, 2, 3, 4, 5, 6, 7], False)
    page, more = await within(store.page("r", None, 100))
    assert (page, more) == (rows, False)
    page, more = await within(store.page("r", 1, 10))
    assert (page, more) == ([], False)
    page, more = await within(store.page("empty", None, 10))
    assert (page, more) == ([], False)


async def test_append_answers_a_retry_with_the_original(store: DatabaseStore) -> None:
    rows = [
        msg("r", 1, sender="alice", cmid="c1"),
        msg("r", 2, sender="bob", cmid="c1"),  # same id, another sender: another message
        msg("r", 3, sender="alice", cmid=None),
        msg("r", 4, sender="alice", cmid="c2"),
    ]
    await within(put(store, rows))
    await within(put(store, [msg("other", 1, sender="alice", cmid="c1")]))  # another room
    again = await within(
        store.append(
            "r",
            [
                new(msg("r", 0, sender="alice", cmid="c1", content="changed")),  # a retry
                new(msg("r", 0, sender="carol", cmid="c9")),  # new: seq 5
                new(msg("r", 0, sender="carol", cmid="c9")),  # its retry in the same batch
                new(msg("r", 0, sender="alice", cmid=None)),  # no id: always new, seq 6
                new(msg("r", 0, sender="bob", cmid="c1")),  # a retry
            ],
        )
    )
    assert [(a.row.seq, a.created) for a in again] == [
        (1, False),
        (5, True),
        (5, False),
        (6, True),
        (2, False),
    ]
    assert again[0].row == rows[0] and again[4].row == rows[1]
    assert again[1].row == again[2].row
    assert seqs(await within(store.after("r", 0, None, 100))) == [1, 2, 3, 4, 5, 6]
    assert await within(store.max_seq("r")) == 6


async def test_append_keeps_ascending_seq_order(store: DatabaseStore, sync_db: Any) -> None:
    # Several batches, two rooms interleaved, as room writers produce them.
    await within(put(store, batch("a", 1, 3)))
    await within(put(store, batch("b", 1, 2)))
    await within(put(store, batch("a", 4, 9)))
    await within(put(store, batch("b", 3, 3)))
    await within(put(store, batch("a", 10, 10)))

    assert seqs(await within(store.after("a", 0, None, 100))) == list(range(1, 11))
    assert seqs(await within(store.after("b", 0, None, 100))) == [1, 2, 3]
    assert await within(store.last_seqs(["a", "b", "never"])) == {"a": 10, "b": 3}
    # Rows went in in seq order (insertion order = pk order), inside each batch too.
    by_pk = await within(
        sync_db(
            lambda c: _rows(c, "SELECT seq FROM messages WHERE room_id = :r ORDER BY pk", r="a")
        )
    )
    assert [s for (s,) in by_pk] == list(range(1, 11))


async def test_a_failed_append_stores_nothing_and_moves_no_counter(
    store: DatabaseStore, sync_db: Any
) -> None:
    await within(put(store, batch("r", 1, 3)))
    taken = await within(store.after("r", 0, 1, 1))
    # The third post reuses a stored message id: the whole batch is refused.
    bad = [msg("r", 4), msg("r", 5), attrs.evolve(msg("r", 6), id=taken[0].id)]
    with pytest.raises(DuplicateError):
        await within(store.append("r", [new(r) for r in bad]))
    assert seqs(await within(store.after("r", 0, None, 100))) == [1, 2, 3]
    assert await within(store.max_seq("r")) == 3
    # The store is still usable, on the same connection pool, from the same task.
    await within(put(store, batch("r", 4, 6)))
    assert await within(
        sync_db(lambda c: _rows(c, "SELECT room_id, last_seq FROM rooms WHERE room_id = 'r'"))
    ) == [("r", 6)]


async def test_values_with_sql_in_them_are_stored_as_they_are(store: DatabaseStore) -> None:
    """Every value reaches the database as an escaped parameter (on MySQL the append's
    statements go as one multi-statement query: text built into it could run SQL)."""
    nasty = "x'; DROP TABLE rooms; -- %s %% %(a)s \\' \" \\"
    room = "r'; --%s"
    rows = [
        msg(room, 1, sender="s'%s", cmid=nasty, content=nasty),
        msg(room, 2, sender="bob", cmid="c\\", content="100%"),
    ]
    await within(put(store, rows))
    again = await within(store.append(room, [new(rows[0]), new(rows[1])]))
    assert [(a.row, a.created) for a in again] == [(rows[0], False), (rows[1], False)]
    assert await within(store.after(room, 0, None, 10)) == rows
    assert await within(store.last_seqs([room])) == {room: 2}


async def test_an_append_split_over_several_queries_stores_the_same(
    store: DatabaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past multi.QUERY_BYTES the MySQL batch goes as several INSERTs and queries
    (the last ends in COMMIT): seqs, retries and the group are as in one."""
    monkeypatch.setattr(multi, "QUERY_BYTES", 200)
    await within(put(store, batch("big", 1, 2, cmid=None)))
    first = [msg("big", s, cmid=f"k{s}", content="y" * 150) for s in range(3, 8)]
    others = [batch(f"o{i}", 1, 3) for i in range(4)]
    await within(asyncio.gather(put(store, first), *(put(store, rows) for rows in others)))
    again = await within(store.append("big", [new(first[2]), new(msg("big", 0, cmid="k8"))]))
    assert [(a.row.seq, a.created) for a in again] == [(5, False), (8, True)]
    assert seqs(await within(store.after("big", 0, None, 100))) == list(range(1, 9))
    assert await within(store.after("big", 2, 7, 100)) == first
    for i in range(4):
        assert await within(store.after(f"o{i}", 0, None, 10)) == others[i]


async def test_a_room_whose_counter_row_is_gone_fails_then_is_made_again(
    store: DatabaseStore, sync_db: Any
) -> None:
    """A database restored without a room's counter row: the append fails, writes
    nothing, and the next one creates the row again."""
    await within(put(store, batch("gone", 1, 1)))

    def drop(c: sa.Connection) -> None:
        c.execute(sa.text("DELETE FROM messages WHERE room_id = 'gone'"))
        c.execute(sa.text("DELETE FROM rooms WHERE room_id = 'gone'"))
        c.commit()

    await within(sync_db(drop))
    with pytest.raises(StoreError, match=r"no counter row for rooms \['gone'\]"):
        await within(store.append("gone", [new(msg("gone", 1, cmid="c1"))]))
    assert await within(sync_db(_stored("gone"))) == []
    rows = [msg("gone", 1, cmid="c1"), msg("gone", 2)]
    await within(put(store, rows))
    assert await within(store.after("gone", 0, None, 10)) == rows
    assert await within(store.max_seq("gone")) == 2


async def test_concurrent_appends_are_grouped_and_a_clash_fails_only_its_caller(
    store: DatabaseStore,
) -> None:
    await within(put(store, batch("clash", 1, 1)))
    taken = (await within(store.after("clash", 0, 1, 1)))[0]
    calls = [store.append(f"g{i}", [new(r) for r in batch(f"g{i}", 1, 3)]) for i in range(20)]
    calls.insert(10, store.append("clash", [new(attrs.evolve(msg("clash", 2), id=taken.id))]))
    results = await within(asyncio.gather(*calls, return_exceptions=True))
    assert isinstance(results[10], DuplicateError)
    assert all(isinstance(r, list) for i, r in enumerate(results) if i != 10), results
    for i in range(20):
        assert seqs(await within(store.after(f"g{i}", 0, None, 10))) == [1, 2, 3]
    assert seqs(await within(store.after("clash", 0, None, 10))) == [1]


async def test_two_writers_on_one_room_never_collide(backend_url: str) -> None:
    """Two servers (two stores) appending to one room at once: every post gets its
    own seq, the seqs have no holes, and each store's seqs rise in its own order."""
    stores = [DatabaseStore(backend_url, op_timeout=OP_TIMEOUT) for _ in range(2)]
    for s in stores:
        await within(s.connect())
    try:

        async def writer(s: DatabaseStore, name: str) -> list[int]:
            got = []
            for n in range(30):
                answers = await s.append(
                    "shared", [new(msg("shared", 0, sender=name, cmid=f"{name}{n}"))] * (n % 3 + 1)
                )
                got += [a.row.seq for a in answers if a.created]
            return got

        a, b = await within(asyncio.gather(writer(stores[0], "a"), writer(stores[1], "b")), 30)
        assert a == sorted(a) and b == sorted(b)
        assert sorted(a + b) == list(range(1, 61)), "one seq each, no hole"
        assert await within(stores[0].max_seq("shared")) == 60
    finally:
        for s in stores:
            await within(s.close())


async def test_an_append_does_not_wait_for_another_rooms_commit(mysql_url: str) -> None:
    """MySQL: a post of room B is stored while room A's append is stuck in its
    transaction (an outside session holds A's counter row); before, one writer
    task per process made every room wait for the transaction in flight."""
    s = DatabaseStore(mysql_url, op_timeout=OP_TIMEOUT)
    await within(s.connect())
    await put(s, [msg("room-a", 1)])  # both counter rows exist
    await put(s, [msg("room-b", 1)])
    engine = _engine(mysql_url)
    try:
        with engine.connect() as blocker:
            blocker.execute(sa.text("BEGIN"))
            blocker.execute(
                sa.text("SELECT last_seq FROM rooms WHERE room_id = 'room-a' FOR UPDATE")
            )
            stuck = asyncio.create_task(s.append("room-a", [new(msg("room-a", 2))]))
            await asyncio.sleep(0.3)
            assert not stuck.done()
            (b,) = await within(s.append("room-b", [new(msg("room-b", 2))]), 1.5)
            assert b.row.seq == 2 and not stuck.done(), stuck  # A still waits for its lock
            blocker.execute(sa.text("ROLLBACK"))
        (a,) = await within(stuck)
        assert a.row.seq == 2
    finally:
        engine.dispose()
        await within(s.close(), T + OP_TIMEOUT)


async def test_client_msg_ids_compare_byte_for_byte(store: DatabaseStore) -> None:
    """Case, trailing spaces and accents make different ids, on every backend.

    (MariaDB's utf8mb4_bin pads: "x" and "x " were one key there.)
    """
    ids = ["x", "x ", "x  ", "X", "é", "e", "e\u0301", "😀", "😀 "]
    rows = [msg("r", n, sender="alice", cmid=cmid) for n, cmid in enumerate(ids, start=1)]
    await within(put(store, rows))
    retries = await within(store.append("r", [new(r) for r in reversed(rows)]))
    assert [(a.row, a.created) for a in retries] == [(r, False) for r in reversed(rows)]
    (fresh,) = await within(store.append("r", [new(msg("r", 0, sender="alice", cmid="x   "))]))
    assert fresh.created and fresh.row.seq == len(ids) + 1


async def test_utf8mb4_round_trips(store: DatabaseStore) -> None:
    contents = [
        "😀🎉",
        "中文字符，日本語のテキスト，한국어",
        "𝄞 𠜎 🀄 𝕏 — 4-byte characters",
        "mixed: héllo wörld ½ ∑ 😀 中",
        "😀" * 1024,  # 4096 bytes of 4-byte characters
        "x" * 4096,
        "中" * 1365 + "x",  # 4096 bytes, 3-byte characters
        "line\nbreak\ttab 'quote' \"dq\" \\ backslash % percent",
    ]
    assert all(len(c.encode()) <= 4096 for c in contents)
    assert len(contents[4].encode()) == 4096 and len(contents[6].encode()) == 4096
    rows = [msg("r", n, content=c, cmid=f"ü😀{n}") for n, c in enumerate(contents, start=1)]
    await within(put(store, rows))
    back = await within(store.after("r", 0, None, 100))
    assert back == rows
    assert [r.content.encode() for r in back] == [c.encode() for c in contents]
    (retry,) = await within(store.append("r", [new(msg("r", 0, cmid="ü😀5"))]))
    assert not retry.created and retry.row.content == "😀" * 1024


async def test_sent_at_ms_round_trips(store: DatabaseStore) -> None:
    rng = random.Random(1234)
    stamps = [
        BASE_MS,
        BASE_MS + 1,
        BASE_MS + 999,
        1_795_000_000_000,
        1_795_000_000_001,
        1_795_000_000_999,
        86_400_000,
        4_102_444_799_999,  # 2099-12-31T23:59:59.999
        int(time.time() * 1000),
    ] + [rng.randrange(86_400_000, 4_102_444_800_000) for _ in range(200)]
    rows = [msg("r", n, ms=ms) for n, ms in enumerate(stamps, start=1)]
    await within(put(store, rows))
    back = await within(store.after("r", 0, None, 1000))
    assert [r.sent_at_ms for r in back] == stamps
    page, _ = await within(store.page("r", None, 1000))
    assert [r.sent_at_ms for r in page] == stamps


async def test_touch_clients_keeps_first_seen_and_moves_last_seen(
    store: DatabaseStore, sync_db: Any
) -> None:
    t1 = datetime(2026, 11, 27, 10, 0, 0, 123000)
    t2 = t1 + timedelta(seconds=5, milliseconds=456)
    t3 = t2 + timedelta(minutes=1, milliseconds=1)

    def clients(c: sa.Connection) -> dict[str, tuple[int, int]]:
        rows = _rows(c, "SELECT sender_id, first_seen, last_seen FROM clients")
        return {sender: (_ms(first), _ms(last)) for sender, first, last in rows}

    await within(store.touch_clients({"alice": t1, "bob": t1}))
    assert await within(sync_db(clients)) == {
        "alice": (_ms(t1), _ms(t1)),
        "bob": (_ms(t1), _ms(t1)),
    }
    await within(store.touch_clients({"alice": t2, "carol": t2}))
    assert await within(sync_db(clients)) == {
        "alice": (_ms(t1), _ms(t2)),
        "bob": (_ms(t1), _ms(t1)),
        "carol": (_ms(t2), _ms(t2)),
    }
    await within(store.touch_clients({"alice": t3}))
    assert (await within(sync_db(clients)))["alice"] == (_ms(t1), _ms(t3))
    await within(store.touch_clients({}))  # nothing to do, no error


def _ms(value: Any) -> int:
    """A datetime from the sync drivers (naive UTC; SQLite may give a string) in ms."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    epoch = datetime(1970, 1, 1)
    return round((value - epoch) / timedelta(milliseconds=1))


def _type(text: str) -> str:
    """A column type as the dialect writes it, minus what reflection adds or drops."""
    text = re.sub(r"\s+(CHARACTER SET|COLLATE)\s+\w+", "", text.upper())
    return re.sub(r"^(BIGINT|INTEGER|INT)\(\d+\)", r"\1", text).strip()


async def test_migrations_create_the_schema_of_schema_py(backend_url: str) -> None:
    engine = _engine(backend_url)

    def inspect() -> dict[str, Any]:
        insp = sa.inspect(engine)
        dialect = engine.dialect
        tables: dict[str, Any] = {}
        for name in insp.get_table_names():
            if name == "alembic_version":
                continue
            tables[name] = {
                "columns": {
                    c["name"]: (_type(c["type"].compile(dialect=dialect)), c["nullable"])
                    for c in insp.get_columns(name)
                },
                "pk": insp.get_pk_constraint(name)["constrained_columns"],
                "unique": sorted(
                    (u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(name)
                ),
                "options": insp.get_table_options(name) if dialect.name == "mysql" else {},
            }
        return tables

    def expected() -> dict[str, Any]:
        dialect = engine.dialect
        tables: dict[str, Any] = {}
        for table in metadata.sorted_tables:
            tables[table.name] = {
                "columns": {
                    c.name: (_type(c.type.compile(dialect=dialect)), c.nullable)
                    for c in table.columns
                },
                "pk": [c.name for c in table.primary_key.columns],
                "unique": sorted(
                    (u.name, tuple(c.name for c in u.columns))
                    for u in table.constraints
                    if isinstance(u, sa.UniqueConstraint)
                ),
            }
        return tables

    try:
        actual = await within(asyncio.to_thread(inspect))
    finally:
        engine.dispose()
    want = expected()
    assert sorted(actual) == sorted(want) == ["clients", "messages", "rooms"]
    for name, spec in want.items():
        assert actual[name]["columns"] == spec["columns"], name
        assert actual[name]["pk"] == spec["pk"], name
        assert actual[name]["unique"] == spec["unique"], name
    assert actual["messages"]["columns"]["created_at"][0] in ("DATETIME(3)", "DATETIME")
    if backend_url.startswith("mysql"):
        for name in want:
            options = actual[name]["options"]
            assert options.get("mysql_engine") == "InnoDB", (name, options)
            assert options.get("mysql_default charset") == "utf8mb4", (name, options)
            # Binary and NO PAD: ids compare byte for byte (see the 0001 migration).
            assert options.get("mysql_collate") in ("utf8mb4_nopad_bin", "utf8mb4_0900_bin"), (
                name,
                options,
            )


# -- MariaDB behind a proxy: cut and stalled connections ----------------------------


@pytest.fixture
async def proxy(mysql_url: str) -> AsyncIterator[TcpProxy]:
    url = make_url(mysql_url)
    p = TcpProxy(url.host or "127.0.0.1", url.port or 3306)
    await within(p.start())
    try:
        yield p
    finally:
        await within(p.close())
        assert p.connections == 0


@pytest.fixture
async def proxied(mysql_url: str, proxy: TcpProxy) -> AsyncIterator[DatabaseStore]:
    """A MariaDB store whose every connection goes through ``proxy``."""
    s = DatabaseStore(with_host(mysql_url, proxy.host, proxy.port), op_timeout=OP_TIMEOUT)
    await within(s.connect())
    try:
        yield s
    finally:
        # Bounded: a connection leaked by a failed operation would make this hang.
        await within(s.close(), T)


@pytest.fixture
def mysql_sync(mysql_url: str) -> Iterator[Callable[..., Any]]:
    """Like ``sync_db``, straight to MariaDB (not through the proxy)."""
    yield from _sync_runner(mysql_url)


@pytest.fixture
async def mysql_store(mysql_url: str) -> AsyncIterator[DatabaseStore]:
    """A MariaDB store, straight to the server."""
    async for s in _opened(mysql_url):
        yield s


async def test_a_mysql_append_is_two_round_trips(
    mysql_store: DatabaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN, the counters' FOR UPDATE, the retry lookup; then INSERT, UPDATEs, COMMIT."""
    for room in ("rt", "rt2", "rt3"):
        await within(put(mysql_store, batch(room, 1, 1)))  # counter rows known: none created
    sent: list[str] = []
    original = aiomysql.Connection._execute_command

    async def counting(self: Any, command: int, sql: str | bytes) -> Any:
        sent.append(sql.decode() if isinstance(sql, bytes) else sql)
        return await original(self, command, sql)

    monkeypatch.setattr(aiomysql.Connection, "_execute_command", counting)
    await within(put(mysql_store, batch("rt", 2, 3, cmid=None)))
    assert len(sent) == 2, sent
    assert sent[0].startswith("BEGIN; SELECT room_id, last_seq FROM rooms")
    assert sent[0].endswith("FOR UPDATE")  # no client_msg_id: no lookup
    assert sent[1].startswith("INSERT INTO messages") and sent[1].endswith("; COMMIT")
    sent.clear()
    # A group of three rooms with retries: still two, one UPDATE per room.
    await within(asyncio.gather(*(put(mysql_store, [msg(r, 2, cmid="c")]) for r in ("rt2", "rt3"))))
    assert len(sent) == 2, sent
    assert re.fullmatch(r"BEGIN; SELECT .* FOR UPDATE; SELECT .* FROM messages WHERE .*", sent[0])
    assert sent[1].count("UPDATE rooms SET last_seq") == 2 and sent[1].endswith("; COMMIT")


@pytest.mark.parametrize(
    ("sqlstate", "errno", "error"),
    [("23000", 1062, DuplicateError), ("45000", 1644, StoreError)],
    ids=["duplicate", "other"],
)
async def test_a_statement_failing_after_the_insert_stores_nothing(
    mysql_store: DatabaseStore,
    mysql_sync: Any,
    sqlstate: str,
    errno: int,
    error: type[StoreError],
) -> None:
    """The counter UPDATE fails after the batch's INSERT ran: the append raises (an
    error in any result set of the batch is read), and nothing is stored."""
    await within(put(mysql_store, batch("doomed", 1, 3)))
    await within(put(mysql_store, batch("fine", 1, 1)))
    trigger = (
        "CREATE TRIGGER fail_update BEFORE UPDATE ON rooms FOR EACH ROW "
        "BEGIN IF NEW.room_id = 'doomed' AND NEW.last_seq > 3 THEN "
        f"SIGNAL SQLSTATE '{sqlstate}' SET MYSQL_ERRNO = {errno}, "
        "MESSAGE_TEXT = 'refused by the test trigger'; END IF; END"
    )
    await within(mysql_sync(lambda c: c.execute(sa.text(trigger))))

    with pytest.raises(error) as info:
        await within(put(mysql_store, batch("doomed", 4, 6)))
    assert (type(info.value) is DuplicateError) == (error is DuplicateError)
    if error is not DuplicateError:  # (a lone duplicate is answered "unexpected duplicate key")
        assert "refused by the test trigger" in str(info.value)
    assert await within(mysql_sync(_stored("doomed"))) == [1, 2, 3]
    assert await within(mysql_store.max_seq("doomed")) == 3
    if error is DuplicateError:
        # In a group: the duplicate makes the writer retry caller by caller, so
        # only the caller at fault fails.
        results = await within(
            asyncio.gather(
                put(mysql_store, batch("fine", 2, 2)),
                put(mysql_store, batch("doomed", 4, 4)),
                put(mysql_store, batch("new", 1, 2)),
                return_exceptions=True,
            )
        )
        assert results[0] is None and results[2] is None, results
        assert isinstance(results[1], DuplicateError), results
        assert await within(mysql_sync(_stored("fine"))) == [1, 2]
        assert await within(mysql_sync(_stored("new"))) == [1, 2]
    assert await within(mysql_sync(_stored("doomed"))) == [1, 2, 3]
    await within(mysql_sync(lambda c: c.execute(sa.text("DROP TRIGGER fail_update"))))
    await within(put(mysql_store, batch("doomed", 4, 5)))  # the same pool, still good
    assert await within(mysql_sync(_stored("doomed"))) == [1, 2, 3, 4, 5]


async def test_the_retry_lookup_runs_once_the_counter_lock_is_held(
    mysql_store: DatabaseStore, mysql_url: str
) -> None:
    """Another server stores the post while this append waits for the room's counter:
    the lookup, run after the lock is granted, finds that copy (no duplicate key)."""
    await within(put(mysql_store, batch("lk", 1, 3)))
    original = msg("lk", 4, cmid="late")
    blocker = _engine(mysql_url).connect()
    try:
        lock = "SELECT last_seq FROM rooms WHERE room_id = 'lk' FOR UPDATE"
        await within(asyncio.to_thread(lambda: blocker.execute(sa.text(lock))))
        retry = attrs.evolve(original, id=uuid.uuid4().hex, content="the retry")
        writer = asyncio.create_task(mysql_store.append("lk", [new(retry)]))
        try:
            async with asyncio.timeout(T):  # wait until the append waits for the lock
                while not await asyncio.to_thread(_lock_waits, mysql_url):
                    await asyncio.sleep(0.02)

            def store_original() -> None:
                blocker.execute(
                    sa.text(
                        "INSERT INTO messages (room_id, seq, id, sender_id, content, "
                        "client_msg_id, created_at) VALUES ('lk', 4, :id, 'alice', :content, "
                        "'late', :at)"
                    ),
                    {"id": original.id, "content": original.content, "at": _at(original)},
                )
                blocker.execute(sa.text("UPDATE rooms SET last_seq = 4 WHERE room_id = 'lk'"))
                blocker.commit()

            await within(asyncio.to_thread(store_original))
            (answer,) = await within(writer)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    finally:
        await within(asyncio.to_thread(blocker.close))
    assert (answer.row, answer.created) == (original, False)
    assert await within(mysql_store.max_seq("lk")) == 4


def _at(row: StoredMessage) -> datetime:
    return datetime(1970, 1, 1) + timedelta(milliseconds=row.sent_at_ms)


async def _fails_fast(awaitable: Any, limit: float = 1.0) -> StoreError:
    """The call raises StoreError, well before the store's op timeout."""
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await within(awaitable)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"took {elapsed:.2f} s: {info.value}"
    return info.value


def _stored(room: str) -> Callable[[sa.Connection], list[int]]:
    return lambda c: [
        s for (s,) in _rows(c, "SELECT seq FROM messages WHERE room_id = :r ORDER BY seq", r=room)
    ]


async def test_cut_fails_fast_then_the_same_store_recovers(
    proxied: DatabaseStore,
    proxy: TcpProxy,
    mysql_url: str,
    mysql_sync: Any,
) -> None:
    await within(put(proxied, batch("r", 1, 3)))
    assert await within(proxied.max_seq("r")) == 3

    await within(proxy.cut())
    await _fails_fast(put(proxied, batch("r", 4, 6)))
    await _fails_fast(proxied.max_seq("r"))
    await _fails_fast(proxied.ping())
    await _fails_fast(proxied.page("r", None, 10))
    assert await within(mysql_sync(_stored("r"))) == [1, 2, 3]  # nothing of the failed batch
    # New connections are refused too.
    fresh = DatabaseStore(with_host(mysql_url, proxy.host, proxy.port), op_timeout=OP_TIMEOUT)
    await _fails_fast(fresh.connect())

    await within(proxy.restore())
    # The very first call after the restore works, from the same task and store.
    assert await within(proxied.max_seq("r")) == 3
    await within(put(proxied, batch("r", 4, 6)))
    assert seqs(await within(proxied.after("r", 0, None, 100))) == [1, 2, 3, 4, 5, 6]
    await within(proxied.ping())
    assert await within(mysql_sync(_stored("r"))) == [1, 2, 3, 4, 5, 6]


async def test_cut_in_the_middle_of_a_transaction_leaves_nothing(
    proxied: DatabaseStore,
    proxy: TcpProxy,
    mysql_url: str,
    mysql_sync: Any,
) -> None:
    """An append is cut while it waits for its room's counter row (another writer holds it)."""
    await within(put(proxied, batch("nr", 1, 3)))
    # Another session holds the room's counter row (an uncommitted append of
    # another server): the store's transaction waits on that row lock.
    blocker = _engine(mysql_url).connect()
    try:
        await within(
            asyncio.to_thread(
                lambda: blocker.execute(
                    sa.text("SELECT last_seq FROM rooms WHERE room_id = 'nr' FOR UPDATE")
                )
            )
        )
        writer = asyncio.create_task(put(proxied, batch("nr", 4, 6)))
        try:
            async with asyncio.timeout(T):  # wait until the store's append is blocked
                while not await asyncio.to_thread(_lock_waits, mysql_url):
                    await asyncio.sleep(0.02)
            await within(proxy.cut())
            started = time.monotonic()
            with pytest.raises(StoreError):
                await within(writer)
            assert time.monotonic() - started < 1.0
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        await within(asyncio.to_thread(blocker.rollback))
    finally:
        await within(asyncio.to_thread(blocker.close))

    assert await within(mysql_sync(_stored("nr"))) == [1, 2, 3]
    assert await within(
        mysql_sync(lambda c: _rows(c, "SELECT last_seq FROM rooms WHERE room_id = 'nr'"))
    ) == [(3,)]

    await within(proxy.restore())
    await within(put(proxied, batch("nr", 4, 6)))
    assert await within(mysql_sync(_stored("nr"))) == [1, 2, 3, 4, 5, 6]


def _lock_waits(mysql_url: str) -> bool:
    engine = _engine(mysql_url)
    try:
        with engine.connect() as c:
            return bool(
                _rows(
                    c, "SELECT 1 FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
                )
            )
    finally:
        engine.dispose()


async def test_repeated_cuts_mid_operation_leak_no_connection(
    proxied: DatabaseStore, proxy: TcpProxy, mysql_sync: Any
) -> None:
    """More broken operations than the pool has connections (maxsize 10)."""
    await within(put(proxied, batch("r", 1, 1)))
    for n in range(2, 14):
        await within(proxied.ping())  # a pooled connection, warm
        await within(proxy.stall())  # the next request is held in flight...
        # ...once from a short-lived task, once from this (long-lived) task.
        call = put(proxied, batch("r", n, n))
        pending = asyncio.create_task(call) if n % 2 else None
        cutter = asyncio.create_task(_cut_later(proxy, 0.05))
        try:
            with pytest.raises(StoreError):
                await within(pending if pending is not None else call)
        finally:
            await within(cutter)
        await within(proxy.restore())
    # Still one working pool, and every failed batch left nothing.
    assert await within(proxied.max_seq("r")) == 1
    await within(put(proxied, batch("r", 2, 3)))
    assert await within(mysql_sync(_stored("r"))) == [1, 2, 3]


async def _cut_later(proxy: TcpProxy, delay: float) -> None:
    await asyncio.sleep(delay)
    await proxy.cut()


async def test_stalled_database_times_out_within_op_timeout(
    mysql_url: str,
    proxy: TcpProxy,
    mysql_sync: Any,
) -> None:
    """A silent partition (no reset) is only noticed by the store's own op timeout."""
    s = DatabaseStore(with_host(mysql_url, proxy.host, proxy.port), op_timeout=1.0)
    await within(s.connect())
    try:
        await within(put(s, batch("r", 1, 2)))
        await within(proxy.stall())
        for call in (lambda: put(s, batch("r", 3, 4)), lambda: s.max_seq("r")):
            started = time.monotonic()
            with pytest.raises(StoreError, match="timed out"):
                await within(call())
            assert 0.9 < time.monotonic() - started < 2.0
        await within(proxy.restore())
        assert await within(s.max_seq("r")) == 2
        await within(put(s, batch("r", 3, 4)))
        assert await within(mysql_sync(_stored("r"))) == [1, 2, 3, 4]
    finally:
        await within(s.close())


async def test_proxy_close_leaves_no_task(mysql_url: str) -> None:
    url = make_url(mysql_url)
    before = asyncio.all_tasks()
    p = await within(TcpProxy(url.host or "127.0.0.1", url.port or 3306).start())
    s = DatabaseStore(with_host(mysql_url, p.host, p.port), op_timeout=OP_TIMEOUT)
    await within(s.connect())
    try:
        await within(s.ping())
        assert p.connections == 1
        await within(p.stall())
        stalled = asyncio.create_task(s.ping())
        await asyncio.sleep(0.05)
        await within(p.close())
        with pytest.raises(StoreError):
            await within(stalled)
    finally:
        await within(s.close())
    assert p.connections == 0
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(OSError):
        await within(asyncio.open_connection(p.host, p.port))


def test_threaded_proxy_cut_restore_close(mysql_url: str) -> None:
    """The thread-hosted proxy, for tests whose database clients are other processes."""
    url = make_url(mysql_url)
    proxy = ThreadedProxy(url.host or "127.0.0.1", url.port or 3306).start()

    def connect() -> Any:
        return pymysql.connect(
            host=proxy.host,
            port=proxy.port,
            user=url.username or "root",
            password=url.password or "",
            connect_timeout=2,
            read_timeout=2,
        )

    try:
        conn = connect()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
        proxy.cut()
        with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        with pytest.raises(pymysql.err.OperationalError):
            connect()
        proxy.restore()
        conn = connect()
        with conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchall() == ((2,),)
        conn.close()
        assert any(t.name == proxy.thread_name for t in threading.enumerate())
    finally:
        proxy.close()
    assert not any(t.name == proxy.thread_name for t in threading.enumerate())
    assert proxy.proxy is not None and proxy.proxy.connections == 0
