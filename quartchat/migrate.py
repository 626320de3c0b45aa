"""Schema migrations: alembic upgrade to head on the configured database.

Alembic runs with a synchronous driver in a worker thread, so it works the
same from the CLI, from app start-up and from async tests.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from pathlib import Path

import redis.exceptions
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .config import Settings
from .validate import (
    MYSQL_SCHEME,
    SQLITE_SCHEME,
    is_redis_cluster_url,
    is_redis_url,
    is_sqlite_url,
    parse_cluster_url,
)

__all__ = [
    "MIGRATION_ERRORS",
    "alembic_config",
    "current_revision",
    "head_revision",
    "sync_url",
    "upgrade",
    "upgrade_async",
    "upgrade_locked",
]

log = logging.getLogger(__name__)

# What a failed migration raises: the database or the Redis lock unreachable or
# refusing, alembic's own errors, an unsupported URL. The CLI reports these in
# one line and exits 1; anything else is a bug and keeps its traceback.
MIGRATION_ERRORS = (
    OSError,
    ValueError,
    sa.exc.SQLAlchemyError,
    CommandError,
    redis.exceptions.RedisError,
)


def sync_url(url: str) -> str:
    """The synchronous-driver form of a store URL, for alembic."""
    if url.startswith(SQLITE_SCHEME):
        return "sqlite://" + url[len(SQLITE_SCHEME) :]
    if url.startswith(MYSQL_SCHEME):
        sync = "mysql+pymysql://" + url[len(MYSQL_SCHEME) :]
        return sync + ("&" if "?" in sync else "?") + "charset=utf8mb4"
    raise ValueError(f"unsupported database URL {url!r}")


def _script_location() -> str:
    # The top-level migrations/ folder is installed as quartchat.migrations
    # (pyproject's package mapping), so it is not a module mypy can see.
    migrations = importlib.import_module(f"{__package__}.migrations")
    assert migrations.__file__ is not None
    return str(Path(migrations.__file__).parent)


def alembic_config(url: str) -> Config:
    """An alembic Config for ``url`` without any ini file."""
    config = Config()
    config.set_main_option("script_location", _script_location())
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config(SQLITE_SCHEME)).get_current_head()


def current_revision(url: str) -> str | None:
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str) -> None:
    """Apply every pending migration (a no-op when the schema is at head)."""
    if is_sqlite_url(url):
        path = url[len(SQLITE_SCHEME) + 1 :].split("?", 1)[0]
        if path and not path.startswith(":") and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if current_revision(url) == head_revision():
        return
    log.info("migrating %s to %s", url.split("://", 1)[0], head_revision())
    command.upgrade(alembic_config(url), "head")


def upgrade_locked(settings: Settings) -> None:
    """:func:`upgrade`, under a Redis lock when a Redis broker is configured.

    Several processes or hosts starting at once then run the migrations exactly
    once; the others wait for the lock and find the schema already at head.
    """
    if not is_redis_url(settings.broker_url):
        upgrade(settings.database_url)
        return
    import redis

    client: redis.Redis | redis.RedisCluster
    if is_redis_cluster_url(settings.broker_url):
        parsed = parse_cluster_url(settings.broker_url)
        client = redis.RedisCluster(
            startup_nodes=[
                redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                for h, p in parsed.nodes
            ],
            username=parsed.username,
            password=parsed.password,
            socket_connect_timeout=5,
        )
    else:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5)
    try:
        with client.lock(
            f"{settings.redis_prefix}:lock:migrate", timeout=600, blocking_timeout=600
        ):
            upgrade(settings.database_url)
    finally:
        client.close()


async def upgrade_async(settings: Settings) -> None:
    """:func:`upgrade_locked` from async code, in a thread."""
    await asyncio.to_thread(upgrade_locked, settings)
