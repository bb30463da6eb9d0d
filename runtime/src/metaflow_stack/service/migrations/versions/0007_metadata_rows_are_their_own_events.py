"""A metadata row is its own event: numbered from the event log's counter, with no event row beside it.

Each metadata write also appended an event row (and, for ``attempt`` and
``attempt_ok``, a ``task-status`` row): at 8 concurrent writers that second
row cost 5 to 13 points of the write rate (``docs/benchmarks.md``). Now the
metadata row takes its ``seq`` from the same counter as ``events`` and the
log is read as the two tables merged in ``seq`` order (``event_bus``), so
the relay's snapshot rule covers both. On PostgreSQL the column's default
is read back from ``events.seq`` (the transaction's id, then the number:
revision 0006), so both tables are numbered by one definition; SQLite's
single writer takes numbers from the ``events`` row of ``sqlite_sequence``
(``event_log.number``), which ``AUTOINCREMENT`` then continues after.

Rows written before this revision keep no number: their events are in the
log already. Every server must run this revision's code once it is applied:
an older one still writes event rows for its metadata and reads only
``events``, so its relay would skip the metadata rows' numbers as rolled
back (``docs/metadata-service.md``: stop old replicas before upgrading). A
downgrade keeps the rows but leaves their events out of the log.

The partial index holds numbered rows only. ``pruned_seq`` records how far
pruning reached, so the metadata rows it covers (which stay, as data) leave
the log with the event rows around them.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("metadata", sa.Column("seq", _ID, nullable=True))
    op.add_column("relay_state", sa.Column("pruned_seq", sa.BigInteger(), server_default="0", nullable=False))
    op.create_index(
        "ix_metadata_seq",
        "metadata",
        ["seq"],
        unique=False,
        postgresql_where=sa.text("seq IS NOT NULL"),
        sqlite_where=sa.text("seq IS NOT NULL"),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        default = bind.execute(
            sa.text(
                "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef JOIN pg_attribute ON "
                "attrelid = adrelid AND attnum = adnum WHERE adrelid = 'events'::regclass AND attname = 'seq'"
            )
        ).scalar_one()
        op.execute(f"ALTER TABLE metadata ALTER COLUMN seq SET DEFAULT {default}")


def downgrade() -> None:
    op.drop_index("ix_metadata_seq", table_name="metadata")
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+), as revision 0005 does.
    op.drop_column("metadata", "seq")
    op.drop_column("relay_state", "pruned_seq")
