"""Event numbers without a PL/pgSQL call: the transaction's id, then the number, in the column's default.

Revision 0005 numbered an event through ``stack_next_event_seq()``, a
PL/pgSQL function, so that a transaction takes its id before its number
(any transaction holding a number not yet visible then shows in later
snapshots as open, and the relay can tell a number in flight from one
rolled back). Calling it cost concurrent writers about two points of their
rate. The default now says the same in SQL: a ``CASE`` evaluates its
condition before its result, and ``nextval``, volatile, is never evaluated
ahead of time, so ``pg_current_xact_id()`` (which never returns NULL) has
assigned the id before the number is taken. SQLite is unchanged.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NEXT_SEQ = "CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('events_seq') END"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE events ALTER COLUMN seq SET DEFAULT {NEXT_SEQ}")
    op.execute("DROP FUNCTION stack_next_event_seq()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # 0005's function, to the same effect (its own downgrade drops it).
    op.execute(f"CREATE FUNCTION stack_next_event_seq() RETURNS bigint LANGUAGE sql AS $$ SELECT {NEXT_SEQ} $$")
    op.execute("ALTER TABLE events ALTER COLUMN seq SET DEFAULT stack_next_event_seq()")
