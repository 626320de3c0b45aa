"""The tables, as SQLAlchemy Core objects used by the queries.

The alembic migrations in ``migrations/versions`` create exactly these; a test
compares the two so they cannot drift apart.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

__all__ = ["DATETIME_MS", "clients", "messages", "metadata", "rooms"]

metadata = sa.MetaData()

# Millisecond precision on MySQL (plain DATETIME drops fractions there).
DATETIME_MS = sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")
_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("pk", _PK, primary_key=True, autoincrement=True),
    sa.Column("room_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("sender_id", sa.String(64), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("client_msg_id", sa.String(64), nullable=True),
    sa.Column("created_at", DATETIME_MS, nullable=False),
    sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_seq"),
    sa.UniqueConstraint(
        "room_id", "sender_id", "client_msg_id", name="uq_messages_room_sender_cmid"
    ),
    sa.UniqueConstraint("id", name="uq_messages_id"),
)

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("room_id", sa.String(64), primary_key=True),
    sa.Column("created_at", DATETIME_MS, nullable=False),
    # The room's seq counter: moved in the same transaction as the insert (0002).
    sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"),
)

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("sender_id", sa.String(64), primary_key=True),
    sa.Column("first_seen", DATETIME_MS, nullable=False),
    sa.Column("last_seen", DATETIME_MS, nullable=False),
)
