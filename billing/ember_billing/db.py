"""Engines and transactions for the two backends: SQLite (WAL) embedded, PostgreSQL
by URL. Everything dialect-specific about connecting lives here."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from ember_core.errors import ConfigError

# SQLite runs one writer at a time. Threads of one process queue on this lock instead
# of in SQLite's busy handler, which sleeps in growing steps and turns 64 contending
# threads into a convoy of sleepers. Other processes still meet busy_timeout.
_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()

#: How long a SQLite writer waits for the lock before failing (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` mean psycopg 3; ``sqlite:///path`` stays."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def dialect_of(url: str) -> str:
    name = make_url(normalize_url(url)).get_backend_name()
    if name not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"ledger URL {url!r} names {name!r}; use sqlite:///path/ledger.db or "
            "postgresql://user@host:port/db"
        )
    return name


def make_engine(
    url: str, *, pool_size: int = 8, max_overflow: int = 16, durable: bool = True
) -> Engine:
    """An engine with the settings the ledger's correctness depends on.

    ``durable=False`` skips the flush to disk at commit (SQLite ``synchronous=NORMAL``,
    PostgreSQL ``synchronous_commit=off``): atomicity, isolation and locking are
    unchanged, only the last commits may be lost if the *machine* crashes. For tests
    of concurrency, never for a ledger that bills."""
    url = normalize_url(url)
    if dialect_of(url) == "postgresql":
        # No pre-ping: it costs a round trip per transaction on the hot path. A dropped
        # connection fails its transaction cleanly (nothing half-written) and the
        # pool replaces it; recycling bounds how stale a pooled connection gets.
        engine = create_engine(
            url, pool_size=pool_size, max_overflow=max_overflow, pool_recycle=1800
        )
        if not durable:

            @event.listens_for(engine, "connect")
            def _no_sync(dbapi_conn: Any, _record: Any) -> None:
                with dbapi_conn.cursor() as cur:
                    cur.execute("SET synchronous_commit = off")
                dbapi_conn.commit()

        return engine
    if make_url(url).database in (None, "", ":memory:"):
        raise ConfigError(
            "the ledger needs a SQLite file (sqlite:///path/ledger.db): an in-memory "
            "database is private to one connection and loses everything on exit"
        )
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=pool_size,
        max_overflow=max_overflow,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself (pysqlite would
        # otherwise defer it until the first write).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed settle survives power loss too, not just a process kill.
        cur.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Checkpoint every ~40 MB of WAL rather than SQLite's 4 MB: a settled batch
        # dirties pages all over the reservations table, and at 4 MB every batch paid a
        # checkpoint (a write and an fsync of the database file). Durability does not
        # depend on it: each commit still fsyncs the WAL. The file is cut back to
        # 64 MB after a checkpoint. Page cache 32 MiB a connection, allocated as used.
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        cur.execute("PRAGMA journal_size_limit=67108864")
        cur.execute("PRAGMA cache_size=-32768")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # SQLite refuses to change the safety level inside a transaction, so a hold-only
        # transaction (see session_scope) sets it here, just before BEGIN.
        flush = durable and not conn.get_execution_options().get(_HOLD_ONLY, False)
        level = "FULL" if flush else "NORMAL"
        if conn.info.get("synchronous") != level:
            conn.exec_driver_sql(f"PRAGMA synchronous={level}")
            conn.info["synchronous"] = level
        # IMMEDIATE takes the write lock up front: a transaction that reads and then
        # writes can never fail mid-way with "database is locked" on the upgrade, and
        # read-then-decide code inside it sees data no one else can change.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    _SQLITE_WRITERS[engine] = threading.Lock()
    return engine


_HOLD_ONLY = "ember_hold_only"


@contextmanager
def session_scope(
    engine: Engine, *, snapshot: bool = False, hold_only: bool = False
) -> Iterator[Session]:
    """One transaction: committed if the block returns, rolled back if it raises.

    ``snapshot=True`` makes every statement of the transaction see the same committed
    state (REPEATABLE READ on PostgreSQL, whose default READ COMMITTED gives each
    statement its own): for reports that add up several queries while settlements
    commit. SQLite transactions here are serialized anyway.

    ``hold_only=True`` commits without waiting for the disk (SQLite ``synchronous=NORMAL``,
    PostgreSQL ``synchronous_commit=off`` for this transaction), for writes that are holds,
    not money: reservations. Both logs are sequential, so the next durable commit (the
    request's settlement) makes this one durable too; a machine crash before that loses
    only holds of requests that were running on it, which is what releasing them means.
    It takes a fsync (~1-3 ms) off the path every request waits on before it starts."""
    lock = _SQLITE_WRITERS.get(engine)
    options: dict[str, Any] = {}
    if snapshot and lock is None:
        options["isolation_level"] = "REPEATABLE READ"
    postgres = engine.dialect.name == "postgresql"
    if hold_only and not postgres:
        options[_HOLD_ONLY] = True
    bind = engine.execution_options(**options) if options else engine
    with lock if lock is not None else nullcontext():
        session = Session(bind, expire_on_commit=False, autoflush=False)
        try:
            with session.begin():
                if hold_only and postgres:
                    session.execute(text("SET LOCAL synchronous_commit = off"))
                yield session
        finally:
            session.close()
