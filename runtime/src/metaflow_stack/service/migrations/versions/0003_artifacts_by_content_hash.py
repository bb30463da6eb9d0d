"""Artifacts found by content hash: where one value was stored across a flow.

The UI's lineage and the agent's ``search_artifacts(sha=...)`` ask for every
artifact of a flow holding one value (``sha:eq``); without this index that is
a scan of the flow's artifact rows.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_artifacts_flow_sha", "artifacts", ["flow_id", "sha", "id"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_flow_sha", table_name="artifacts")
