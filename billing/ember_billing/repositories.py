"""SQL for the ledger, one function per statement or small query.

Repositories never commit and never decide policy: ``service.py`` owns transactions
and decisions. Every write that guards an invariant is a single conditional statement
whose row count (or RETURNING) says whether it happened, so no check-then-act race
exists on either backend.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    Row,
    String,
    Table,
    and_,
    any_,
    bindparam,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ember_billing.models import (
    ApiKey,
    Budget,
    Price,
    Quota,
    RateWindow,
    Reservation,
    Tenant,
    UsageEvent,
)


def _table(model: Any) -> Table:
    return cast(Table, model.__table__)


_KEYS, _PRICES, _QUOTAS, _BUDGETS = (_table(m) for m in (ApiKey, Price, Quota, Budget))
_RESERVATIONS, _EVENTS = _table(Reservation), _table(UsageEvent)

# Hot-path statements are built once: composing a SQLAlchemy expression costs more
# CPU than running it. Bind parameter names never equal column names (b_*).
_KEY_BY_ID = select(
    _KEYS.c.id, _KEYS.c.tenant_id, _KEYS.c.prefix, _KEYS.c.revoked_at, _KEYS.c.expires_at
).where(_KEYS.c.id == bindparam("b_id"))
_PRICE_AT = (
    select(_PRICES.c.id)
    .where(
        _PRICES.c.model == bindparam("b_model"),
        _PRICES.c.adapter == bindparam("b_adapter"),
        _PRICES.c.effective_from <= bindparam("b_at"),
    )
    .order_by(_PRICES.c.effective_from.desc())
    .limit(1)
)
_LIMITS = (
    select(
        _QUOTAS.c.key_id,
        _QUOTAS.c.spend_cap_micros,
        _QUOTAS.c.tokens_per_minute,
        _BUDGETS.c.id,
        _BUDGETS.c.cap_micros - _BUDGETS.c.spent_micros - _BUDGETS.c.reserved_micros,
    )
    .outerjoin(
        _BUDGETS,
        and_(
            _BUDGETS.c.tenant_id == _QUOTAS.c.tenant_id,
            _BUDGETS.c.key_id == _QUOTAS.c.key_id,
            _BUDGETS.c.period == bindparam("b_period"),
        ),
    )
    .where(
        _QUOTAS.c.tenant_id == bindparam("b_tenant"),
        _QUOTAS.c.key_id.in_(bindparam("b_keys", expanding=True)),
    )
)
_HOLD = (
    update(_BUDGETS)
    .where(
        _BUDGETS.c.id == bindparam("b_id"),
        _BUDGETS.c.spent_micros + _BUDGETS.c.reserved_micros + bindparam("b_amount")
        <= _BUDGETS.c.cap_micros,
    )
    .values(reserved_micros=_BUDGETS.c.reserved_micros + bindparam("b_amount"))
)


def _id_set(name: str, *, pg: bool) -> Any:
    """A bound list of ids: one array parameter on PostgreSQL (``= ANY(:ids)``, one
    plan whatever the batch size), an expanding ``IN (...)`` on SQLite."""
    if pg:
        return any_(bindparam(name, type_=ARRAY(String)))
    return bindparam(name, expanding=True)


def _by_ids(pg: bool) -> dict[str, Any]:
    r = _RESERVATIONS.c
    ids, states = _id_set("b_ids", pg=pg), _id_set("b_from", pg=pg)
    return {
        "lock": select(_RESERVATIONS)
        .where(r.id == ids if pg else r.id.in_(ids))
        .order_by(r.id)
        .with_for_update(),
        "set_state": update(_RESERVATIONS)
        .where(
            r.id == ids if pg else r.id.in_(ids),
            r.state == states if pg else r.state.in_(states),
        )
        .values(state=bindparam("b_state")),
    }


_BY_IDS = {True: _by_ids(True), False: _by_ids(False)}


def _stmt(session: Session, name: str) -> Any:
    return _BY_IDS[session.get_bind().dialect.name == "postgresql"][name]


def key_row(session: Session, key_id: str) -> Any:
    return session.connection().execute(_KEY_BY_ID, {"b_id": key_id}).first()


def _insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT, which has ON CONFLICT on both backends."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def find_tenant(session: Session, tenant: str) -> Tenant | None:
    """By id, else by name."""
    row = session.get(Tenant, tenant)
    if row is None:
        row = session.scalars(select(Tenant).where(Tenant.name == tenant)).first()
    return row


def find_key_by_prefix(session: Session, prefix: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()


def revoke_key(session: Session, key_id: str, now: dt.datetime) -> bool:
    res = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def current_price(session: Session, model: str, adapter: str, at: dt.datetime) -> int | None:
    """Id of the adapter's own price if it has one, else the base model's, as of ``at``."""
    conn = session.connection()
    for name in dict.fromkeys((adapter, "")):
        found = conn.execute(_PRICE_AT, {"b_model": model, "b_adapter": name, "b_at": at}).scalar()
        if found is not None:
            return int(found)
    return None


def limits_for(
    session: Session, tenant_id: str, key_ids: Iterable[str], period: str
) -> list[tuple[str, int | None, int | None, int | None, int | None]]:
    """``(key_id, spend cap, tokens per minute, this period's budget id, what the
    budget had left when read)`` of each quota of the tenant and these keys."""
    params = {"b_tenant": tenant_id, "b_keys": ["", *key_ids], "b_period": period}
    return [(k, c, t, b, r) for k, c, t, b, r in session.connection().execute(_LIMITS, params)]


def upsert_quota(
    session: Session,
    tenant_id: str,
    key_id: str,
    *,
    spend_cap_micros: int | None,
    tokens_per_minute: int | None,
) -> None:
    values = {"spend_cap_micros": spend_cap_micros, "tokens_per_minute": tokens_per_minute}
    stmt = _insert(session, Quota).values(tenant_id=tenant_id, key_id=key_id, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=["tenant_id", "key_id"], set_=values))


def ensure_budget(
    session: Session, tenant_id: str, key_id: str, period: str, cap_micros: int
) -> int:
    """The budget row of this scope and period, made on first use; its id."""
    q = select(Budget.id).where(
        Budget.tenant_id == tenant_id, Budget.key_id == key_id, Budget.period == period
    )
    found = session.execute(q).scalar()
    if found is not None:
        return int(found)
    session.execute(
        _insert(session, Budget)
        .values(
            tenant_id=tenant_id,
            key_id=key_id,
            period=period,
            cap_micros=cap_micros,
            spent_micros=0,
            reserved_micros=0,
        )
        .on_conflict_do_nothing()
    )
    return int(session.execute(q).scalar_one())


def set_budget_cap(session: Session, tenant_id: str, key_id: str, period: str, cap: int) -> None:
    session.execute(
        update(Budget)
        .where(Budget.tenant_id == tenant_id, Budget.key_id == key_id, Budget.period == period)
        .values(cap_micros=cap)
    )


def hold_budget(session: Session, budget_id: int, amount: int) -> bool:
    """Adds ``amount`` to the hold only if the cap still covers it: one atomic statement."""
    res = session.connection().execute(_HOLD, {"b_id": budget_id, "b_amount": amount})
    return bool(res.rowcount)


def budget_remaining(session: Session, budget_id: int) -> int:
    b = session.get(Budget, budget_id)
    return 0 if b is None else max(0, b.cap_micros - b.spent_micros - b.reserved_micros)


def move_budgets(session: Session, moves: dict[int, tuple[int, int]]) -> None:
    """``{budget_id: (release_from_hold, add_to_spent)}``, in id order so two
    transactions touching the same budgets lock them in the same order."""
    if not moves:
        return
    t = cast(Table, Budget.__table__)
    stmt = (
        update(t)
        .where(t.c.id == bindparam("b_id"))
        .values(
            reserved_micros=t.c.reserved_micros - bindparam("b_release"),
            spent_micros=t.c.spent_micros + bindparam("b_spend"),
        )
    )
    params = [
        {"b_id": bid, "b_release": rel, "b_spend": spend}
        for bid, (rel, spend) in sorted(moves.items())
    ]
    session.connection().execute(stmt, params)


def take_rate_tokens(session: Session, scope: str, minute: int, tokens: int, limit: int) -> bool:
    """Counts ``tokens`` into this minute's window only if it stays within ``limit``."""
    if tokens > limit:
        return False
    stmt = _insert(session, RateWindow).values(scope=scope, minute=minute, tokens=tokens)
    stmt = stmt.on_conflict_do_update(
        index_elements=["scope", "minute"],
        set_={"tokens": RateWindow.tokens + tokens},
        where=RateWindow.tokens + tokens <= limit,
    ).returning(RateWindow.id)
    return session.execute(stmt).first() is not None


_UNNEST_SQL: dict[tuple[str, str | None], tuple[str, list[str]]] = {}


def _unnest_insert(table: Table, conflict_column: str | None) -> tuple[str, list[str]]:
    """``INSERT ... SELECT * FROM unnest(%(col1)s, ...)`` and its column names: a whole
    batch as one statement with one array per column. PostgreSQL plans it once and
    inserts every row in one pass; executemany would run the statement once per row."""
    key = (table.name, conflict_column)
    if key not in _UNNEST_SQL:
        dialect = postgresql.dialect()
        cols = [c for c in table.columns if not (c.primary_key and c.autoincrement is True)]
        arrays = ", ".join(
            f"CAST(%({c.name})b AS {c.type.compile(dialect=dialect)}[])" for c in cols
        )
        sql = (
            f"INSERT INTO {table.name} ({', '.join(c.name for c in cols)}) "
            f"SELECT * FROM unnest({arrays})"
        )
        if conflict_column is not None:
            sql += f" ON CONFLICT ({conflict_column}) DO NOTHING"
        _UNNEST_SQL[key] = (sql, [c.name for c in cols])
    return _UNNEST_SQL[key]


def insert_rows(
    session: Session,
    model: Any,
    rows: Sequence[dict[str, Any]],
    *,
    skip_conflicts_on: str | None = None,
) -> None:
    """Inserts a batch; with ``skip_conflicts_on``, rows whose value in that unique
    column exists already are skipped (ON CONFLICT DO NOTHING) instead of failing."""
    if not rows:
        return
    table = _table(model)
    conn = session.connection()
    if conn.dialect.name == "postgresql" and len(rows) > 1:
        sql, names = _unnest_insert(table, skip_conflicts_on)
        # Straight to psycopg, inside the same transaction, with binary parameters:
        # text-format arrays cost a regex per element to quote, more than the insert.
        raw = conn.connection.driver_connection
        with raw.cursor(binary=True) as cur:  # type: ignore[union-attr]
            cur.execute(sql, {n: [r[n] for r in rows] for n in names})
    elif skip_conflicts_on is not None:
        ins = _insert(session, table).on_conflict_do_nothing(index_elements=[skip_conflicts_on])
        conn.execute(ins, list(rows))
    else:
        conn.execute(table.insert(), list(rows))


def reservations_by_request(session: Session, request_ids: Sequence[str]) -> list[Reservation]:
    if not request_ids:
        return []
    return list(session.scalars(select(Reservation).where(Reservation.request_id.in_(request_ids))))


def lock_reservations(session: Session, ids: Sequence[str]) -> dict[str, Row[Any]]:
    """Rows locked for this transaction, in id order (no deadlock between batches).
    Core rows, not ORM objects: this is the hot path of batched settlement."""
    rows = session.connection().execute(_stmt(session, "lock"), {"b_ids": sorted(set(ids))})
    return {r.id: r for r in rows}


def set_reservation_state(
    session: Session, ids: Sequence[str], state: str, *, only_from: Sequence[str]
) -> int:
    params = {"b_ids": list(ids), "b_from": list(only_from), "b_state": state}
    return int(session.connection().execute(_stmt(session, "set_state"), params).rowcount)


def claim_expired(session: Session, now: dt.datetime, limit: int) -> list[Reservation]:
    """Open reservations past their expiry, locked; rows a settle holds are skipped."""
    return list(
        session.scalars(
            select(Reservation)
            # A literal 'open', so both planners can use the partial index on it.
            .where(Reservation.state == literal_column("'open'"), Reservation.expires_at < now)
            .order_by(Reservation.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
