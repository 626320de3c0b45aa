"""A throwaway MariaDB/MySQL database for tests.

The server comes from ``QUARTCHAT_TEST_MYSQL_URL`` (default
``mysql+aiomysql://root@127.0.0.1:3306``; a database part, if any, is ignored).
Each :func:`create_database` makes a new, uniquely named, utf8mb4/utf8mb4_bin
database and returns its ``mysql+aiomysql://.../<name>`` URL;
:func:`drop_database` drops it again.

The tests that use MariaDB must not silently turn into skips when it is down:
the fixtures *fail*, naming the URL and how to start the service.

``tests/conftest.py`` imports the fixtures, so every test module may ask for
``mysql_url`` by name.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy.engine import URL, make_url

from quartchat.migrate import upgrade

__all__ = [
    "DEFAULT_SERVER_URL",
    "MySQLUnavailable",
    "create_database",
    "drop_database",
    "mysql_server_url",
    "mysql_url",
    "server_url",
    "with_host",
]

DEFAULT_SERVER_URL = "mysql+aiomysql://root@127.0.0.1:3306"
ENV = "QUARTCHAT_TEST_MYSQL_URL"
CONNECT_TIMEOUT = 5  # seconds, for connect, read and write of the admin connection
_NAME = re.compile(r"^qc_test_[0-9]+_[0-9a-f]+$")


class MySQLUnavailable(RuntimeError):
    """The test MariaDB/MySQL server cannot be reached or refuses to create databases."""


def server_url() -> str:
    """The test server URL from the environment, or the default."""
    return os.environ.get(ENV) or DEFAULT_SERVER_URL


def _parse(url: str) -> URL:
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        raise ValueError(f"{ENV} must be a mysql+aiomysql:// URL, not {url!r}")
    return parsed


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _admin_connect(url: URL) -> Any:
    try:
        return pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            charset="utf8mb4",
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=CONNECT_TIMEOUT * 6,  # DROP DATABASE can take a moment
            write_timeout=CONNECT_TIMEOUT,
            autocommit=True,
        )
    except pymysql.MySQLError as exc:
        shown = url.render_as_string(hide_password=True)
        raise MySQLUnavailable(
            f"cannot reach the test MariaDB/MySQL server at {shown} ({exc}). "
            f"Start it with `bash ops/ensure-services.sh`, or point {ENV} at a server "
            f"(mysql+aiomysql://USER:PASS@HOST:PORT) where the user may CREATE DATABASE."
        ) from exc


def create_database(server: str | None = None) -> str:
    """Create a new empty utf8mb4 database on ``server``; return its aiomysql URL."""
    base = _parse(server or server_url())
    name = f"qc_test_{os.getpid()}_{secrets.token_hex(4)}"
    conn = _admin_connect(base)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    except pymysql.MySQLError as exc:
        raise MySQLUnavailable(f"cannot create test database {name}: {exc}") from exc
    finally:
        conn.close()
    return _render(base.set(drivername="mysql+aiomysql", database=name))


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database` (and nothing else)."""
    parsed = _parse(url)
    name = parsed.database or ""
    if not _NAME.match(name):
        raise ValueError(f"refusing to drop {name!r}: not a database made by create_database")
    conn = _admin_connect(parsed.set(database=None))
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def with_host(url: str, host: str, port: int) -> str:
    """``url`` with another host and port (e.g. a :class:`tests.proxy.TcpProxy`)."""
    return _render(make_url(url).set(host=host, port=port))


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    """The server URL, checked once per session: fails (never skips) when unreachable."""
    url = server_url()
    problem = None
    try:
        _admin_connect(_parse(url)).close()
    except MySQLUnavailable as exc:
        problem = str(exc)
    if problem is not None:  # outside the except: no chained traceback in the report
        pytest.fail(problem, pytrace=False)
    return url


@pytest.fixture
def mysql_url(mysql_server_url: str) -> Iterator[str]:
    """A fresh database for this test, migrated to head; dropped afterwards."""
    problem = None
    try:
        url = create_database(mysql_server_url)
    except MySQLUnavailable as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        upgrade(url)
        yield url
    finally:
        drop_database(url)
