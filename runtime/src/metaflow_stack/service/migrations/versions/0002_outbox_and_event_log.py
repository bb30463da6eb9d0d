"""Outbox apart from the event log: the relay appends numbered events instead of updating them.

Revision 0001 numbered and then flagged each event in place: two row updates
per event, each touching every index of the table, which cost writers a third
of their throughput. Now writers append to ``outbox``; the relay moves a batch
into ``events`` with its numbers (one insert, one delete) and keeps the last
number handed out and the last one published in the one-row ``relay_state``.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_EVENT = "flow_id, run_number, kind, body, ts_epoch"


def _event_columns() -> list[sa.Column]:
    return [
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", _ID, nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", _JSON, nullable=False),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        *_event_columns(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(f"INSERT INTO outbox ({_EVENT}) SELECT {_EVENT} FROM events WHERE seq IS NULL ORDER BY id")
    op.create_table(
        "relay_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("published_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        sa.text(
            "INSERT INTO relay_state (id, last_seq, published_seq) "
            "SELECT 1, (SELECT COALESCE(MAX(seq), 0) FROM events), "
            "(SELECT COALESCE(MAX(seq), 0) FROM events WHERE published = :yes)"
        ).bindparams(yes=True)
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_unpublished")
        batch_op.drop_index("ix_events_run")
    op.rename_table("events", "events_0001")
    op.create_table(
        "events",
        sa.Column("seq", _ID, autoincrement=False, nullable=False),
        sa.Column("run_seq", sa.BigInteger(), nullable=True),
        *_event_columns(),
        sa.PrimaryKeyConstraint("seq", name="events_seq_pkey"),
    )
    op.execute(
        f"INSERT INTO events (seq, run_seq, {_EVENT}) SELECT seq, run_seq, {_EVENT} FROM events_0001 "
        "WHERE seq IS NOT NULL ORDER BY seq"
    )
    op.drop_table("events_0001")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_run", ["run_number", "run_seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_run")
    op.rename_table("events", "events_0002")
    op.create_table(
        "events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        *_event_columns(),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("run_seq", sa.BigInteger(), nullable=True),
        sa.Column("published", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("seq"),
    )
    op.execute(
        sa.text(
            f"INSERT INTO events ({_EVENT}, seq, run_seq, published) "
            f"SELECT {_EVENT}, seq, run_seq, seq <= (SELECT published_seq FROM relay_state) FROM events_0002 "
            "ORDER BY seq"
        )
    )
    op.execute(f"INSERT INTO events ({_EVENT}) SELECT {_EVENT} FROM outbox ORDER BY id")
    op.drop_table("events_0002")
    op.drop_table("relay_state")
    op.drop_table("outbox")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_run", ["run_number", "run_seq"], unique=False)
        batch_op.create_index("ix_events_unpublished", ["published", "id"], unique=False)
