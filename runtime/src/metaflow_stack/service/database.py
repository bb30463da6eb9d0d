"""Connecting to the service's database, and migrating it.

One URL picks the engine: a path or ``sqlite:///...`` is the embedded default
(one file, WAL, so readers never wait for the writer), ``postgresql://...``
is production (psycopg 3). An optional read URL (a replica) serves reads;
writes always go to the primary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from metaflow_stack.errors import StackError
from metaflow_stack.patterns import compile_pattern

#: Held while migrating, so replicas that start together migrate once.
_MIGRATION_LOCK = 7_300_001


@dataclass(frozen=True)
class Database:
    """The primary (``writer``) and the engine reads use (a replica, or the primary)."""

    url: str
    writer: Engine
    reader: Engine

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()


def normalize_url(url: str) -> str:
    """A SQLAlchemy URL from what a user writes: a file path, ``sqlite:``, ``postgres(ql)://``."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    if scheme.startswith("postgresql") or scheme == "sqlite":
        return url
    raise StackError(
        f"unsupported database URL scheme {scheme!r}",
        fix="use a file path, sqlite:///<file> or postgresql://user:pass@host/db",
    )


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_size=16, max_overflow=16, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        # Transactions are begun explicitly below; pysqlite's own implicit BEGIN is off.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()
        # Replaces SQLAlchemy's REGEXP, which runs Python's backtracking ``re`` on a user's pattern.
        dbapi_connection.create_function("regexp", 2, _regexp, deterministic=True)

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Writers take the write lock up front: a deferred transaction that reads, then
        # writes, fails at once with "database is locked" instead of waiting its turn.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


_compiled = functools.lru_cache(maxsize=64)(compile_pattern)


def _regexp(pattern: str, value: str | None) -> bool | None:
    """SQLite's ``value REGEXP pattern``, matched by RE2 in time linear in the value."""
    if value is None:
        return None
    return _compiled(pattern, "pattern").search(value.encode()) is not None


def _engine(url: str, immediate: bool) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, immediate)
    return create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)


def connect(url: str, read_url: str | None = None) -> Database:
    """Engines for ``url`` (and ``read_url`` for reads, when given)."""
    url = normalize_url(url)
    writer = _engine(url, immediate=True)
    reader = _engine(normalize_url(read_url), immediate=False) if read_url else writer
    if url.startswith("sqlite") and not read_url:
        # WAL readers run beside the writer, so reads get their own (deferred) engine.
        reader = _engine(url, immediate=False)
    return Database(url=url, writer=writer, reader=reader)


def migrate(database: Database, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (alembic), once even if several servers start at once."""
    _alembic(database, command.upgrade, revision)


def downgrade(database: Database, revision: str) -> None:
    """Take the schema back down to ``revision`` (``base`` drops every table)."""
    _alembic(database, command.downgrade, revision)


def _alembic(database: Database, action, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", "metaflow_stack.service:migrations")
    with database.writer.begin() as connection:
        if database.dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        action(config, revision)
