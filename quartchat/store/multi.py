"""MySQL multi-statement queries: several statements in one round trip.

The statements arrive already escaped (``cursor.mogrify``, pymysql's escaping
of parameters: see :class:`.mysql.MysqlDialect` on why nothing may be built
into the SQL text). :func:`run` sends them in as few queries as fit in
:data:`QUERY_BYTES` each and reads every result set, in order, so an error in
any statement (the last ``COMMIT`` included) raises; the server runs none of
a query's statements after a failed one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["MULTI_STATEMENTS", "QUERY_BYTES", "insert_rows", "run"]

MULTI_STATEMENTS = 1 << 16  # pymysql.constants.CLIENT.MULTI_STATEMENTS (a client_flag)
# Most bytes in one query, as pymysql's executemany (max_stmt_length), far
# below the server's max_allowed_packet (16 MiB by default on MariaDB).
QUERY_BYTES = 1_000_000


def insert_rows(cursor: Any, insert_sql: str, rows: Sequence[Sequence[Any]]) -> list[str]:
    """``insert_sql`` (one row's ``INSERT ... VALUES (...)``) as INSERTs of many rows
    each, values escaped by pymysql; none is longer than QUERY_BYTES unless
    one row is (as pymysql's ``executemany``)."""
    head, _, values = insert_sql.partition(" VALUES ")
    texts = [cursor.mogrify(values, tuple(row)) for row in rows]
    return list(_packed(texts, ", ", head + " VALUES "))


async def run(cursor: Any, texts: Sequence[str]) -> list[list[tuple[Any, ...]]]:
    """Escaped statements sent as few multi-statement queries as fit in
    QUERY_BYTES each (in order, one query after the other). Every result
    set is read, so an error in any statement raises; returns each statement's rows."""
    results: list[list[tuple[Any, ...]]] = []
    for query in _packed(texts, "; "):
        await cursor.execute(query)  # no params: already escaped, % is not re-formatted
        results.append(list(await cursor.fetchall()))
        while await cursor.nextset():
            results.append(list(await cursor.fetchall()))
    if len(results) != len(texts):
        raise RuntimeError(f"{len(texts)} statements sent, {len(results)} results read")
    return results


def _packed(parts: Sequence[str], sep: str, head: str = "") -> Iterator[str]:
    """``head`` and ``parts`` joined by ``sep``, in strings of at most QUERY_BYTES each
    (a part longer than that goes alone), in order."""
    group: list[str] = []
    size = len(head)
    for part in parts:
        n = len(part.encode()) + len(sep)
        if group and size + n > QUERY_BYTES:
            yield head + sep.join(group)
            group, size = [], len(head)
        group.append(part)
        size += n
    if group:
        yield head + sep.join(group)
