"""Initial schema: messages, rooms, clients.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Millisecond timestamps on MySQL; explicit lengths everywhere (MySQL needs them);
# utf8mb4 so any emoji round-trips.
DATETIME_MS = sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")
PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _collation() -> str:
    """A binary utf8mb4 collation that does NOT pad: strings equal only byte for byte.

    ``utf8mb4_bin`` is a PAD SPACE collation: it compares (and so unique-checks)
    ``"x"`` and ``"x "`` as equal. A client_msg_id differing from an earlier one
    only in trailing spaces would then be taken for that message's retry by
    ``find_client_ids`` and fail every insert of its batch with a duplicate,
    while SQLite keeps the two apart.
    """
    dialect = op.get_context().dialect
    version = dialect.server_version_info or ()
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"  # MariaDB >= 10.2
    if version >= (8, 0):
        return "utf8mb4_0900_bin"  # MySQL 8: NO PAD
    return "utf8mb4_bin"  # MySQL 5.7 (or offline SQL): no binary NO PAD utf8mb4 collation


def upgrade() -> None:
    MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": _collation()}
    op.create_table(
        "messages",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("room_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("sender_id", sa.String(64), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("client_msg_id", sa.String(64), nullable=True),
        sa.Column("created_at", DATETIME_MS, nullable=False),
        # (room_id, seq) is also the history index: pages are range scans on it.
        sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_seq"),
        sa.UniqueConstraint(
            "room_id", "sender_id", "client_msg_id", name="uq_messages_room_sender_cmid"
        ),
        sa.UniqueConstraint("id", name="uq_messages_id"),
        **MYSQL,
    )
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.String(64), primary_key=True),
        sa.Column("created_at", DATETIME_MS, nullable=False),
        **MYSQL,
    )
    op.create_table(
        "clients",
        sa.Column("sender_id", sa.String(64), primary_key=True),
        sa.Column("first_seen", DATETIME_MS, nullable=False),
        sa.Column("last_seen", DATETIME_MS, nullable=False),
        **MYSQL,
    )


def downgrade() -> None:
    op.drop_table("clients")
    op.drop_table("rooms")
    op.drop_table("messages")
