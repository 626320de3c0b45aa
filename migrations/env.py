"""Alembic environment: runs migrations with a synchronous driver.

quartchat calls alembic in a worker thread (see ``quartchat.migrate``) with the
URL already turned into its sync form (sqlite / mysql+pymysql), because the
stock async env.py calls ``asyncio.run()``, which fails inside a running loop.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set by quartchat.migrate"


def run() -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=None,
                # SQLite cannot ALTER columns in place: batch mode copies tables.
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run()
