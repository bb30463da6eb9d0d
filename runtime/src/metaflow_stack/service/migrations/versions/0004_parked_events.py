"""Parked events: what the broker refused, kept aside so the relay moves on.

An event the broker answers with a refusal (a message over its payload
limit, a subject it will not take) would otherwise be sent again forever,
and nothing after it would go out. The relay records it here with the
broker's reason and carries on; ``GET /admin/parked-events`` lists them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "parked_events",
        sa.Column("seq", _ID, autoincrement=False, nullable=False),
        sa.Column("run_seq", sa.BigInteger(), nullable=True),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", _ID, nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", _JSON, nullable=False),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("parked_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="parked_events_seq_pkey"),
    )


def downgrade() -> None:
    op.drop_table("parked_events")
