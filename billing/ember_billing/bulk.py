"""The hot path's batch statements, run straight on the DB-API driver inside the
session's transaction: reservations and usage events in, reservations locked and
marked settled.

SQLAlchemy builds, caches and processes parameters per row, and at 1,000 rows a
batch that cost as much as the database's own work. Here every statement is a
fixed SQL string, rows are plain tuples, and a list of ids is one parameter
whatever its length: ``= ANY(%b)`` (a binary array) on PostgreSQL, ``IN (SELECT value
FROM json_each(?))`` on SQLite (no limit on host parameters, one cached plan).
Rows go in with ``COPY ... FROM STDIN (FORMAT BINARY)`` on PostgreSQL (psycopg
encodes each row in C) and ``executemany`` on SQLite. Both are plain inserts:
a unique key already taken fails the whole transaction, which is what the
exactly-once guarantee wants from its last line of defence.

Driver errors are raised as SQLAlchemy's (``IntegrityError`` and the rest), so
callers catch the same exceptions on both paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

from sqlalchemy import BigInteger, DateTime, Integer, String, Table
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ember_billing.models import Reservation, UsageEvent


class Locked(NamedTuple):
    """What settlement needs of a reservation (no timestamps: parsing them costs)."""

    id: str
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    adapter: str
    price_id: int
    prompt_tokens: int
    max_completion_tokens: int
    amount_micros: int
    tenant_budget_id: int | None
    key_budget_id: int | None
    state: str


class SeenEvent(NamedTuple):
    """A usage event already recorded: what a duplicate delivery is answered with."""

    request_id: str
    reservation_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int


def _columns(model: Any) -> list[str]:
    table = cast(Table, model.__table__)
    return [c.name for c in table.columns if not (c.primary_key and c.autoincrement is True)]


#: Column order of the tuples ``insert_reservations`` and ``insert_usage_events`` take
#: (callers build them positionally, so the order is spelled out and checked).
RESERVATION_COLUMNS = [
    "id",
    "request_id",
    "tenant_id",
    "key_id",
    "model",
    "adapter",
    "price_id",
    "prompt_tokens",
    "max_completion_tokens",
    "amount_micros",
    "tenant_budget_id",
    "key_budget_id",
    "state",
    "created_at",
    "expires_at",
]
EVENT_COLUMNS = [
    "request_id",
    "reservation_id",
    "journal_id",
    "tenant_id",
    "key_id",
    "model",
    "adapter",
    "price_id",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost_micros",
    "occurred_at",
    "period",
    "day",
]
if _columns(Reservation) != RESERVATION_COLUMNS or _columns(UsageEvent) != EVENT_COLUMNS:
    raise RuntimeError("bulk column lists differ from models.py; update both")  # pragma: no cover
_LOCKED = ", ".join(Locked._fields)
_SEEN = ", ".join(SeenEvent._fields)


def _pg_type(column: Any) -> str:
    t = column.type
    if isinstance(t, BigInteger):
        return "int8"
    if isinstance(t, Integer):
        return "int4"
    if isinstance(t, DateTime):
        return "timestamp"
    if isinstance(t, String):
        return "text"
    raise TypeError(f"no COPY type for {column}")  # pragma: no cover - schema bug


def _copy_types(model: Any, names: list[str]) -> list[str]:
    table = cast(Table, model.__table__)
    return [_pg_type(table.c[n]) for n in names]


_COPY_TYPES = {
    "reservations": _copy_types(Reservation, RESERVATION_COLUMNS),
    "usage_events": _copy_types(UsageEvent, EVENT_COLUMNS),
}


class Driver:
    """The session's DB-API connection, which dialect it speaks, and how a datetime
    is bound on it (SQLite stores the text SQLAlchemy would have written)."""

    __slots__ = ("_dbapi", "pg", "raw", "ts")

    def __init__(self, session: Session) -> None:
        conn = session.connection()
        dialect = conn.dialect
        self.raw: Any = conn.connection.driver_connection
        self.pg = dialect.name == "postgresql"
        self._dbapi: Any = dialect.loaded_dbapi
        proc = DateTime().dialect_impl(dialect).bind_processor(dialect)
        self.ts: Callable[[Any], Any] = proc if proc is not None else _same

    @contextmanager
    def cursor(self, statement: str) -> Iterator[Any]:
        cur = self.raw.cursor(binary=True) if self.pg else self.raw.cursor()
        try:
            yield cur
        except self._dbapi.Error as exc:
            raise _wrap(exc)(statement, None, exc) from exc
        finally:
            cur.close()

    def ids(self, values: Sequence[str]) -> Any:
        """One parameter holding a list of strings (see the module docstring). On
        PostgreSQL it is bound with ``%b``: a text-format array costs a regex per
        element to quote, more than the lookup."""
        return list(values) if self.pg else json.dumps(list(values))


def _same(value: Any) -> Any:
    return value


def _wrap(exc: BaseException) -> type[sa_exc.DBAPIError]:
    """SQLAlchemy's class for a PEP 249 error (``UniqueViolation`` -> ``IntegrityError``)."""
    for base in type(exc).__mro__:
        cls = getattr(sa_exc, base.__name__, None)
        if isinstance(cls, type) and issubclass(cls, sa_exc.DBAPIError):
            return cls
    return sa_exc.DBAPIError


Rows = Iterable[tuple[Any, ...]]


def insert_rows(drv: Driver, table: str, columns: list[str], rows: Rows) -> None:
    """Plain multi-row insert of tuples in ``columns`` order."""
    names = ", ".join(columns)
    if drv.pg:
        sql = f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)"
        with drv.cursor(sql) as cur, cur.copy(sql) as copy:
            copy.set_types(_COPY_TYPES[table])
            for row in rows:
                copy.write_row(row)
        return
    sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"
    with drv.cursor(sql) as cur:
        cur.executemany(sql, rows)


def insert_reservations(drv: Driver, rows: Rows) -> None:
    insert_rows(drv, "reservations", RESERVATION_COLUMNS, rows)


def insert_usage_events(drv: Driver, rows: Rows) -> None:
    """No ON CONFLICT: a second event for a request id fails the transaction."""
    insert_rows(drv, "usage_events", EVENT_COLUMNS, rows)


# The settlement statements by dialect (``True``: PostgreSQL). On PostgreSQL the
# reads are one index probe per id through ``unnest`` + ``LATERAL``: the plain
# ``id = ANY(...)`` form is planned as a scan of the whole table whenever statistics
# are missing or small, as they are in a fresh or fast-growing table. The lock is
# taken in the (sorted) array's order, so two batches never deadlock.
LOCK_SQL = {
    True: "SELECT r.* FROM unnest(%b::text[]) AS k(id) CROSS JOIN LATERAL "
    f"(SELECT {_LOCKED} FROM reservations WHERE id = k.id FOR UPDATE) AS r",
    False: f"SELECT {_LOCKED} FROM reservations WHERE id IN (SELECT value FROM json_each(?))",
}
EVENTS_SQL = {
    True: "SELECT e.* FROM unnest(%b::text[]) AS k(id) CROSS JOIN LATERAL "
    f"(SELECT {_SEEN} FROM usage_events WHERE request_id = k.id) AS e",
    False: f"SELECT {_SEEN} FROM usage_events WHERE request_id IN (SELECT value FROM json_each(?))",
}
# ``+state`` on SQLite: without it the planner walks the open-reservations index
# instead of looking the batch's ids up by primary key (quadratic over a run).
MARK_SETTLED_SQL = {
    True: "UPDATE reservations SET state = 'settled' "
    "WHERE id = ANY(%b) AND state IN ('open', 'expired')",
    False: "UPDATE reservations SET state = 'settled' "
    "WHERE id IN (SELECT value FROM json_each(?)) AND +state IN ('open', 'expired')",
}


def lock_for_settle(drv: Driver, ids: Sequence[str]) -> dict[str, Locked]:
    """The reservations, locked for this transaction in id order on PostgreSQL;
    SQLite's IMMEDIATE transaction holds the whole file."""
    sql = LOCK_SQL[drv.pg]
    with drv.cursor(sql) as cur:
        cur.execute(sql, (drv.ids(sorted(ids)),))
        return {row[0]: Locked._make(row) for row in cur.fetchall()}


def events_by_request(drv: Driver, request_ids: Sequence[str]) -> dict[str, SeenEvent]:
    if not request_ids:
        return {}
    sql = EVENTS_SQL[drv.pg]
    with drv.cursor(sql) as cur:
        cur.execute(sql, (drv.ids(request_ids),))
        return {row[0]: SeenEvent._make(row) for row in cur.fetchall()}


def mark_settled(drv: Driver, ids: Sequence[str]) -> int:
    """``open``/``expired`` -> ``settled``; how many rows changed."""
    sql = MARK_SETTLED_SQL[drv.pg]
    with drv.cursor(sql) as cur:
        cur.execute(sql, (drv.ids(ids),))
        return int(cur.rowcount)
