"""Initial schema: flows, runs, steps, tasks, metadata, artifacts and the event outbox.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "body", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("run_seq", sa.BigInteger(), nullable=True),
        sa.Column("published", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("seq"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_run", ["run_number", "run_seq"], unique=False)
        batch_op.create_index("ix_events_unpublished", ["published", "id"], unique=False)

    op.create_table(
        "flows",
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "system_tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.PrimaryKeyConstraint("flow_id"),
    )
    with op.batch_alter_table("flows", schema=None) as batch_op:
        batch_op.create_index("ix_flows_keyset", ["ts_epoch", "flow_id"], unique=False)

    op.create_table(
        "runs",
        sa.Column(
            "run_number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "system_tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column("last_heartbeat_ts", sa.BigInteger(), nullable=True),
        sa.Column("end_status", sa.String(length=16), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.Column("event_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["flow_id"],
            ["flows.flow_id"],
        ),
        sa.PrimaryKeyConstraint("run_number"),
        sa.UniqueConstraint("flow_id", "run_id", name="uq_runs_run_id"),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index("ix_runs_keyset", ["flow_id", "ts_epoch", "run_number"], unique=False)
        batch_op.create_index("ix_runs_user", ["flow_id", "user_name", "ts_epoch", "run_number"], unique=False)

    op.create_table(
        "steps",
        sa.Column("run_number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("step_name", sa.String(length=255), nullable=False),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "system_tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["run_number"],
            ["runs.run_number"],
        ),
        sa.PrimaryKeyConstraint("run_number", "step_name"),
    )
    op.create_table(
        "tasks",
        sa.Column("task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=True),
        sa.Column("step_name", sa.String(length=255), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "system_tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column("last_heartbeat_ts", sa.BigInteger(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempt_ok", sa.Boolean(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_number", "step_name"],
            ["steps.run_number", "steps.step_name"],
        ),
        sa.PrimaryKeyConstraint("task_id"),
        sa.UniqueConstraint("run_number", "step_name", "task_name", name="uq_tasks_task_name"),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_run_status", ["run_number", "attempt_ok", "task_id"], unique=False)
        batch_op.create_index("ix_tasks_step", ["run_number", "step_name", "task_id"], unique=False)

    op.create_table(
        "artifacts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=True),
        sa.Column("step_name", sa.String(length=255), nullable=False),
        sa.Column("task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=True),
        sa.Column("attempt_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("location", sa.Text(), nullable=True),
        sa.Column("ds_type", sa.String(length=255), nullable=True),
        sa.Column("sha", sa.String(length=255), nullable=True),
        sa.Column("type", sa.String(length=255), nullable=True),
        sa.Column("content_type", sa.String(length=255), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("python_type", sa.String(length=255), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "system_tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.task_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id", "attempt_id", "name", name="uq_artifacts_name"),
    )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.create_index("ix_artifacts_run_name", ["run_number", "name", "id"], unique=False)

    op.create_table(
        "metadata",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("flow_id", sa.String(length=255), nullable=False),
        sa.Column("run_number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=True),
        sa.Column("step_name", sa.String(length=255), nullable=False),
        sa.Column("task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=True),
        sa.Column("field_name", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("ts_epoch", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "system_tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.task_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("metadata", schema=None) as batch_op:
        batch_op.create_index("ix_metadata_field", ["run_number", "step_name", "field_name"], unique=False)
        batch_op.create_index("ix_metadata_task", ["task_id", "id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # Tag filters test the union of user and system tags with ?| / ?&.
        op.create_index("ix_runs_all_tags", "runs", [sa.text("(tags || system_tags)")], postgresql_using="gin")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_runs_all_tags", table_name="runs")
    with op.batch_alter_table("metadata", schema=None) as batch_op:
        batch_op.drop_index("ix_metadata_task")
        batch_op.drop_index("ix_metadata_field")

    op.drop_table("metadata")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index("ix_artifacts_run_name")

    op.drop_table("artifacts")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_step")
        batch_op.drop_index("ix_tasks_run_status")

    op.drop_table("tasks")
    op.drop_table("steps")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_user")
        batch_op.drop_index("ix_runs_keyset")

    op.drop_table("runs")
    with op.batch_alter_table("flows", schema=None) as batch_op:
        batch_op.drop_index("ix_flows_keyset")

    op.drop_table("flows")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_unpublished")
        batch_op.drop_index("ix_events_run")

    op.drop_table("events")
