"""Events numbered at insert: writers append to the log itself, the relay only publishes.

Revision 0002 had writers append to ``outbox`` and the relay move each batch
into ``events`` with its numbers: every event was written twice and deleted
once, on the same two cores as the writes it follows. Now a write appends its
event to ``events`` directly and the event takes its ``seq`` there: from a
sequence on PostgreSQL, through ``stack_next_event_seq()``, which makes the
transaction take its id before the number (so any transaction that holds a
number not yet visible is listed in a later snapshot: the relay can tell a
number still in flight from one rolled back); from ``AUTOINCREMENT`` on
SQLite, whose single writer commits numbers in order. ``run_seq`` goes: a
per-run counter would make every writer of a run wait for the one before;
so does its index (concurrent writers of a run all appended to one leaf).
Whatever was still in the outbox is numbered on the way, as the relay would
have.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_EVENT = "flow_id, run_number, kind, body, ts_epoch"

_NEXT_SEQ = """
CREATE FUNCTION stack_next_event_seq() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    -- The transaction's id first: a transaction holding a number always shows in snapshots as open.
    PERFORM pg_current_xact_id();
    RETURN nextval('events_seq');
END
$$
"""


def _event_columns() -> list[sa.Column]:
    return [
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", _ID, nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", _JSON, nullable=False),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    # What the relay had not numbered yet, numbered after the last number it handed out.
    op.execute(
        f"INSERT INTO events (seq, {_EVENT}) "
        f"SELECT (SELECT last_seq FROM relay_state) + ROW_NUMBER() OVER (ORDER BY id), {_EVENT} FROM outbox"
    )
    op.execute("UPDATE relay_state SET last_seq = (SELECT COALESCE(MAX(seq), last_seq) FROM events)")
    op.drop_table("outbox")
    op.drop_index("ix_events_run", table_name="events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE events_seq OWNED BY events.seq")
        op.execute("SELECT setval('events_seq', (SELECT last_seq FROM relay_state) + 1, false)")
        op.execute(_NEXT_SEQ)
        op.drop_column("events", "run_seq")
        op.execute("ALTER TABLE events ALTER COLUMN seq SET DEFAULT stack_next_event_seq()")
    else:
        # SQLite numbers an INTEGER PRIMARY KEY itself; AUTOINCREMENT never reuses one, even after pruning.
        op.create_table(
            "events_0005",
            sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
            *_event_columns(),
            sqlite_autoincrement=True,
        )
        op.execute(f"INSERT INTO events_0005 (seq, {_EVENT}) SELECT seq, {_EVENT} FROM events ORDER BY seq")
        op.execute("DELETE FROM sqlite_sequence WHERE name = 'events_0005'")
        op.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'events_0005', last_seq FROM relay_state")
        op.drop_table("events")
        op.rename_table("events_0005", "events")
        op.execute("UPDATE sqlite_sequence SET name = 'events' WHERE name = 'events_0005'")
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+): a copied runs table would trip its foreign keys.
    op.drop_column("relay_state", "last_seq")
    op.drop_column("parked_events", "run_seq")
    op.drop_column("runs", "event_seq")


def downgrade() -> None:
    op.add_column("runs", sa.Column("event_seq", sa.BigInteger(), server_default="0", nullable=False))
    op.add_column("parked_events", sa.Column("run_seq", sa.BigInteger(), nullable=True))
    op.add_column("relay_state", sa.Column("last_seq", sa.BigInteger(), server_default="0", nullable=False))
    # The last number handed out, from the counter: since 0007 it may have gone to a metadata row.
    postgresql = op.get_bind().dialect.name == "postgresql"
    counter = (
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM events_seq"
        if postgresql
        else "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
    )
    op.execute(f"UPDATE relay_state SET last_seq = COALESCE(({counter}), published_seq)")
    if postgresql:
        op.execute("ALTER TABLE events ALTER COLUMN seq DROP DEFAULT")
        op.execute("DROP FUNCTION stack_next_event_seq()")
        op.execute("DROP SEQUENCE events_seq")
        op.add_column("events", sa.Column("run_seq", sa.BigInteger(), nullable=True))
    else:
        op.create_table(
            "events_0004",
            sa.Column("seq", _ID, autoincrement=False, nullable=False),
            sa.Column("run_seq", sa.BigInteger(), nullable=True),
            *_event_columns(),
            sa.PrimaryKeyConstraint("seq", name="events_seq_pkey"),
        )
        op.execute(f"INSERT INTO events_0004 (seq, {_EVENT}) SELECT seq, {_EVENT} FROM events")
        op.drop_table("events")
        op.rename_table("events_0004", "events")
    op.create_index("ix_events_run", "events", ["run_number", "run_seq"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        *_event_columns(),
        sa.PrimaryKeyConstraint("id"),
    )
