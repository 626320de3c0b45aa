"""rooms.last_seq: the room's seq counter, assigned by the database.

Every insert of messages takes the room's row lock, reads ``last_seq``,
writes the rows with the next seqs and moves ``last_seq``, all in one
transaction. So seqs are committed in seq order with no holes, and a seq
that a receiver sees missing is always already in the store.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rooms", sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"))
    # Rooms with messages but no rooms row (none are expected) get one, then
    # every counter starts at its room's highest stored seq.
    op.execute(
        "INSERT INTO rooms (room_id, created_at, last_seq) "
        "SELECT room_id, MIN(created_at), 0 FROM messages "
        "WHERE room_id NOT IN (SELECT room_id FROM rooms) GROUP BY room_id"
    )
    op.execute(
        "UPDATE rooms SET last_seq = COALESCE("
        "(SELECT MAX(seq) FROM messages WHERE messages.room_id = rooms.room_id), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("last_seq")
