"""The metadata service's tables: one schema for SQLite and PostgreSQL.

Shaped after Metaflow's own service (flows, runs, steps, tasks, metadata,
artifacts) with three differences that make reads cheap:

- tasks keep their latest ``attempt`` and its ``attempt_ok`` (written in the
  same transaction as the metadata row that carries them), so status filters,
  summaries and failure lists are one indexed query instead of a join over
  every metadata row;
- runs keep ``end_status`` for the same reason;
- a write's events are numbered (``seq``) in its own transaction, so a write
  and its event commit together and nothing is written twice: a metadata
  row is its own event (its ``seq`` column), every other write appends an
  event row to ``events``; the log is the two merged in ``seq`` order
  (``event_bus.the_log``); the relay only publishes it and records how far
  it published, and how far pruning reached, in ``relay_state``.

Every listing has an index that ends in its keyset (sort key, then id), so the
deepest page costs what the first does. Change a table only through a new
alembic revision under ``migrations/versions``.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

#: JSON on SQLite, JSONB (indexable, ``?|`` / ``?&``) on PostgreSQL.
Json = JSON().with_variant(JSONB(), "postgresql")
#: SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer(), "sqlite")

NAME = String(255)


def _common() -> list[Column]:
    return [
        Column("user_name", NAME),
        Column("ts_epoch", BigInteger, nullable=False),
        # Nullable: Metaflow's service stores what the client sent, null included.
        Column("tags", Json),
        Column("system_tags", Json),
    ]


def _task_ref() -> list[Column]:
    """A task-level row's copy of its ids: no join to answer with exposed ids."""
    return [
        Column("flow_id", NAME, nullable=False),
        Column("run_number", Id, nullable=False),
        Column("run_id", NAME),
        Column("step_name", NAME, nullable=False),
        Column("task_id", Id, ForeignKey("tasks.task_id"), nullable=False),
        Column("task_name", NAME),
    ]


flows = Table(
    "flows",
    metadata,
    Column("flow_id", NAME, primary_key=True),
    *_common(),
    Index("ix_flows_keyset", "ts_epoch", "flow_id"),
)

runs = Table(
    "runs",
    metadata,
    Column("run_number", Id, primary_key=True, autoincrement=True),
    Column("flow_id", NAME, ForeignKey("flows.flow_id"), nullable=False),
    Column("run_id", NAME),
    *_common(),
    Column("last_heartbeat_ts", BigInteger),
    Column("end_status", String(16)),
    Column("finished_at", BigInteger),
    UniqueConstraint("flow_id", "run_id", name="uq_runs_run_id"),
    Index("ix_runs_keyset", "flow_id", "ts_epoch", "run_number"),
    Index("ix_runs_user", "flow_id", "user_name", "ts_epoch", "run_number"),
)
# Tag filters test the union of user and system tags with ?| / ?& (PostgreSQL only).
Index("ix_runs_all_tags", text("(tags || system_tags)"), postgresql_using="gin", _table=runs).ddl_if(
    dialect="postgresql"
)

steps = Table(
    "steps",
    metadata,
    Column("run_number", Id, ForeignKey("runs.run_number"), primary_key=True),
    Column("step_name", NAME, primary_key=True),
    Column("flow_id", NAME, nullable=False),
    Column("run_id", NAME),
    *_common(),
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", Id, primary_key=True, autoincrement=True),
    Column("flow_id", NAME, nullable=False),
    Column("run_number", Id, nullable=False),
    Column("run_id", NAME),
    Column("step_name", NAME, nullable=False),
    Column("task_name", NAME),
    *_common(),
    Column("last_heartbeat_ts", BigInteger),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("attempt_ok", Boolean),
    Column("finished_at", BigInteger),
    ForeignKeyConstraint(["run_number", "step_name"], ["steps.run_number", "steps.step_name"]),
    UniqueConstraint("run_number", "step_name", "task_name", name="uq_tasks_task_name"),
    Index("ix_tasks_step", "run_number", "step_name", "task_id"),
    Index("ix_tasks_run_status", "run_number", "attempt_ok", "task_id"),
)

metadata_rows = Table(
    "metadata",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    *_task_ref(),
    Column("field_name", NAME, nullable=False),
    Column("value", Text, nullable=False),
    Column("type", NAME, nullable=False),
    Column("attempt_id", Integer),
    *_common(),
    #: Its number in the event log: on PostgreSQL the default of ``events.seq`` (migration 0007), on SQLite
    #: from the log's counter (``event_log.number``). Rows written before 0007 have none (their events were rows).
    Column("seq", Id),
    Index("ix_metadata_task", "task_id", "id"),
    Index("ix_metadata_field", "run_number", "step_name", "field_name"),
    Index("ix_metadata_seq", "seq", postgresql_where=text("seq IS NOT NULL"), sqlite_where=text("seq IS NOT NULL")),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    *_task_ref(),
    Column("attempt_id", Integer, nullable=False),
    Column("name", NAME, nullable=False),
    Column("location", Text),
    Column("ds_type", NAME),
    Column("sha", NAME),
    Column("type", NAME),
    Column("content_type", NAME),
    Column("size", BigInteger),
    Column("python_type", NAME),
    *_common(),
    UniqueConstraint("task_id", "attempt_id", "name", name="uq_artifacts_name"),
    Index("ix_artifacts_run_name", "run_number", "name", "id"),
    Index("ix_artifacts_flow_sha", "flow_id", "sha", "id"),  # where one value went (lineage)
)


def _event() -> list[Column]:
    """What an event is: the event log's columns after ``seq``, and a parked event's."""
    return [
        Column("flow_id", NAME, nullable=False),
        Column("run_number", Id),
        Column("kind", String(32), nullable=False),
        Column("body", Json, nullable=False),
        Column("ts_epoch", BigInteger, nullable=False),
    ]


#: The event log's rows (with numbered metadata rows, the log), appended to by the writes themselves and kept
#: for replay until pruned. ``seq`` is given at insert: on PostgreSQL by the column's default (a sequence,
#: taken after the transaction's id, see migrations 0005 and 0006), on SQLite by ``AUTOINCREMENT`` (never
#: reused after pruning). Its one index is the primary key: a second one (by run) cost concurrent writers a
#: fifth of their rate, all appending to the same leaf; a run's replay reads the log from ``since`` instead.
events = Table(
    "events",
    metadata,
    Column("seq", Id, primary_key=True, autoincrement=True),
    *_event(),
    sqlite_autoincrement=True,
)

#: Events the broker refused (``reason`` is its answer), set aside so the relay goes on.
parked_events = Table(
    "parked_events",
    metadata,
    Column("seq", Id, autoincrement=False, nullable=False),
    *_event(),
    Column("reason", Text, nullable=False),
    Column("parked_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("seq", name="parked_events_seq_pkey"),
)

#: One row: the last ``seq`` published (every event up to it is out, or parked), and the last pruned (the log
#: starts after it: metadata rows stay as data, their events leave the log with the event rows around them).
relay_state = Table(
    "relay_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("published_seq", BigInteger, nullable=False),
    Column("pruned_seq", BigInteger, nullable=False, server_default="0"),
)
