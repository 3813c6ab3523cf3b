"""``BillingService``: the gateway's only door to money. It owns every transaction;
repositories only run statements, and the decisions are made here in plain Python."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ember_billing import admin, budgets, bulk, reports, repositories
from ember_billing.db import make_engine, session_scope
from ember_billing.ledger import new_id
from ember_billing.migrations import upgrade_to_head
from ember_billing.models import Price, Tenant
from ember_billing.money import Prices
from ember_billing.records import (
    Reservation,
    ReserveRequest,
    SettleResult,
    Usage,
    check_name,
    period_of,
    utcnow,
)
from ember_billing.settlement import settle_batch
from ember_core.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class BillingConfig:
    #: An unsettled reservation is released by the sweeper this long after reserve.
    reservation_ttl_s: float = 900.0
    #: Bring the schema to the newest migration when the service starts.
    migrate: bool = True
    pool_size: int = 8
    max_overflow: int = 16
    #: False skips flushing each commit to disk (see ``db.make_engine``): tests only.
    durable: bool = True

    def __post_init__(self) -> None:
        ttl = self.reservation_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 1e7:
            raise ConfigError(f"reservation_ttl_s must be a positive number, got {ttl!r}")
        for name in ("migrate", "durable"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("pool_size", "max_overflow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BillingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown billing settings {unknown}; known: {sorted(known)}")
        return cls(**values)


def _reservation(row: Any) -> Reservation:
    return Reservation(
        id=row.id,
        request_id=row.request_id,
        tenant_id=row.tenant_id,
        key_id=row.key_id,
        model=row.model,
        adapter=row.adapter,
        prompt_tokens=row.prompt_tokens,
        max_completion_tokens=row.max_completion_tokens,
        amount_micros=row.amount_micros,
        state=row.state,
        expires_at=row.expires_at,
    )


class BillingService(admin.AdminMixin, reports.ReportsMixin):
    """Reserve before a request runs, settle (or release) after; everything else
    (tenants, keys, prices, quotas, usage, invoices, credits) hangs off the same ledger.
    Thread-safe: every call is its own transaction on a pooled connection."""

    def __init__(
        self,
        url: str,
        *,
        config: BillingConfig | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.config = config or BillingConfig()
        self.url = url
        self.engine: Engine = make_engine(
            url,
            pool_size=self.config.pool_size,
            max_overflow=self.config.max_overflow,
            durable=self.config.durable,
        )
        self.clock = clock
        self._prices: dict[int, Prices] = {}  # price rows never change, so caching is exact
        if self.config.migrate:
            upgrade_to_head(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> BillingService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, *, snapshot: bool = False, hold_only: bool = False) -> Any:
        return session_scope(self.engine, snapshot=snapshot, hold_only=hold_only)

    def _price_of(self, session: Session, price_id: int) -> Prices:
        prices = self._prices.get(price_id)
        if prices is None:
            row = session.get(Price, price_id)
            if row is None:
                raise NotFoundError(f"price {price_id} is missing from the price book")
            prices = Prices(row.input_micros, row.cached_input_micros, row.output_micros)
            self._prices[price_id] = prices
        return prices

    # -- authentication ----------------------------------------------------------

    def authenticate(self, api_key: object) -> tuple[str, str]:
        """``(tenant_id, key_id)`` for a presented key, or AuthenticationError."""
        from ember_billing.keys import secret_matches, split_key

        prefix, secret = split_key(api_key)
        with self._session() as s:
            row = repositories.find_key_by_prefix(s, prefix)
            if row is None or not secret_matches(
                secret, salt=row.salt, secret_hash=row.secret_hash
            ):
                raise AuthenticationError(
                    f"unknown API key ek_{prefix}_...; check it, or create one with "
                    "`ember keys create`"
                )
            self._check_key_usable(row, self.clock())
            return row.tenant_id, row.id

    @staticmethod
    def _check_key_usable(row: Any, now: dt.datetime) -> None:
        if row.revoked_at is not None:
            raise AuthenticationError(
                f"API key ek_{row.prefix}_... was revoked; create a new one with "
                "`ember keys create`"
            )
        if row.expires_at is not None and row.expires_at <= now:
            raise AuthenticationError(
                f"API key ek_{row.prefix}_... expired at {row.expires_at:%Y-%m-%d %H:%M} UTC; "
                "create a new one with `ember keys create`"
            )

    # -- reserve / release -------------------------------------------------------

    def reserve(
        self,
        tenant: str,
        key: str,
        model: str,
        adapter: str,
        prompt_tokens: int,
        max_completion_tokens: int,
        *,
        request_id: str | None = None,
    ) -> Reservation:
        """Holds the most this request can cost against every cap that applies, or
        refuses with BudgetExceededError (402, with what remains) / RateLimitError."""
        req = ReserveRequest(
            tenant, key, model, adapter, prompt_tokens, max_completion_tokens, request_id
        )
        return self.reserve_many([req])[0]

    def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[Reservation]:
        """All or nothing: one transaction, and one conditional hold per budget for the
        batch's total. Reserving a request id again returns its first reservation."""
        for r in requests:
            if not isinstance(r, ReserveRequest):
                raise InvalidRequestError(f"expected ReserveRequest, got {type(r).__name__}")
        try:
            return self._reserve_many(requests)
        except IntegrityError:
            # Another caller reserved one of these request ids at the same moment;
            # the retry finds its reservation and returns it.
            return self._reserve_many(requests)

    def _reserve_many(self, requests: Sequence[ReserveRequest]) -> list[Reservation]:
        now = self.clock()
        period = period_of(now)
        expires = now + dt.timedelta(seconds=self.config.reservation_ttl_s)
        given = [r.request_id for r in requests if r.request_id is not None]
        with self._session(hold_only=True) as s:  # holds, not money: no fsync wait
            earlier = {
                row.request_id: row for row in repositories.reservations_by_request(s, given)
            }
            out: list[Reservation] = []
            fresh: list[tuple[Reservation, int]] = []  # with its price id
            holds: dict[tuple[str, str], int] = {}  # budget scope -> amount
            tokens: dict[tuple[str, str], int] = {}  # rate scope -> tokens
            checked: set[tuple[str, str]] = set()
            prices: dict[tuple[str, str], tuple[int, Prices]] = {}
            for r in requests:
                if r.request_id in earlier:
                    old = earlier[r.request_id]
                    if (old.tenant_id, old.key_id) != (r.tenant_id, r.key_id):
                        raise ConflictError(
                            f"request id {r.request_id!r} is already used by another key; "
                            "request ids must be unique",
                            param="request_id",
                        )
                    out.append(_reservation(old))
                    continue
                if (r.tenant_id, r.key_id) not in checked:
                    self._check_tenant_key(s, r.tenant_id, r.key_id, now)
                    checked.add((r.tenant_id, r.key_id))
                priced = prices.get((r.model, r.adapter))
                if priced is None:
                    priced = prices[(r.model, r.adapter)] = self._current_price(s, r, now)
                amount = priced[1].max_cost(
                    prompt_tokens=r.prompt_tokens, max_completion_tokens=r.max_completion_tokens
                )
                n = r.prompt_tokens + r.max_completion_tokens
                for scope in ((r.tenant_id, ""), (r.tenant_id, r.key_id)):
                    holds[scope] = holds.get(scope, 0) + amount
                    tokens[scope] = tokens.get(scope, 0) + n
                rid = new_id()
                res = Reservation(
                    rid,
                    r.request_id or rid,
                    r.tenant_id,
                    r.key_id,
                    r.model,
                    r.adapter,
                    r.prompt_tokens,
                    r.max_completion_tokens,
                    amount,
                    "open",
                    expires,
                )
                fresh.append((res, priced[0]))
                out.append(res)
            if fresh:
                limits = budgets.limits(s, holds, period)
                drv = bulk.Driver(s)
                created, expiry = drv.ts(now), drv.ts(expires)
                bulk.insert_reservations(
                    drv,
                    [
                        (
                            res.id,
                            res.request_id,
                            res.tenant_id,
                            res.key_id,
                            res.model,
                            res.adapter,
                            price_id,
                            res.prompt_tokens,
                            res.max_completion_tokens,
                            res.amount_micros,
                            limits.get((res.tenant_id, ""), (None,))[0],
                            limits.get((res.tenant_id, res.key_id), (None,))[0],
                            "open",
                            created,
                            expiry,
                        )
                        for res, price_id in fresh
                    ],
                )
                budgets.take(s, limits, holds, tokens, now, period)
        return out

    def _current_price(self, s: Session, r: ReserveRequest, now: dt.datetime) -> tuple[int, Prices]:
        price_id = repositories.current_price(s, r.model, r.adapter, now)
        if price_id is None:
            raise ModelNotFoundError(
                f"no price for model {r.model!r}"
                + (f" (adapter {r.adapter!r})" if r.adapter else "")
                + "; unknown models are refused. Add one with "
                "`ember prices set` or BillingService.set_price",
                param="model",
            )
        return price_id, self._price_of(s, price_id)

    def _check_tenant_key(self, s: Session, tenant_id: str, key_id: str, now: dt.datetime) -> None:
        key = repositories.key_row(s, key_id)
        # A key of this tenant proves the tenant exists (foreign key): one query, not two.
        if (key is None or key.tenant_id != tenant_id) and s.get(Tenant, tenant_id) is None:
            raise NotFoundError(
                f"unknown tenant {tenant_id!r}; create it with `ember tenants create`",
                param="tenant",
            )
        if key is None or key.tenant_id != tenant_id:
            raise AuthenticationError(f"API key {key_id!r} does not belong to tenant {tenant_id!r}")
        self._check_key_usable(key, now)

    def release(self, reservation: str | Reservation) -> Reservation:
        """Gives back the hold of a request that never ran. Releasing twice is a
        no-op; releasing a settled request is a ConflictError."""
        reservation_id = reservation.id if isinstance(reservation, Reservation) else reservation
        check_name("reservation", reservation_id)
        with self._session() as s:
            locked = repositories.lock_reservations(s, [reservation_id])
            row = locked.get(reservation_id)
            if row is None:
                raise NotFoundError(
                    f"no reservation {reservation_id!r}; release only what reserve() returned",
                    param="reservation",
                )
            if row.state == "settled":
                raise ConflictError(
                    f"reservation {reservation_id} is settled: the request ran and is billed; "
                    "to refund it, reverse its usage (BillingService.reverse_usage)",
                    param="reservation",
                )
            if row.state in ("open", "expired"):
                repositories.set_reservation_state(
                    s, [row.id], "released", only_from=("open", "expired")
                )
                if row.state == "open":
                    self._give_back(s, [row])
            return _reservation(_Obj({**row._mapping, "state": "released"}))

    @staticmethod
    def _give_back(s: Session, rows: Sequence[Any]) -> None:
        moves: dict[int, tuple[int, int]] = {}
        for r in rows:
            for bid in (r.tenant_budget_id, r.key_budget_id):
                if bid is not None:
                    moves[bid] = (moves.get(bid, (0, 0))[0] + r.amount_micros, 0)
        repositories.move_budgets(s, moves)

    def sweep_expired(self, *, limit: int = 1000) -> int:
        """Expires open reservations past their TTL and gives their holds back.
        A late settle of an expired reservation is still accepted and billed."""
        with self._session() as s:
            rows = repositories.claim_expired(s, self.clock(), limit)
            if rows:
                repositories.set_reservation_state(
                    s, [r.id for r in rows], "expired", only_from=("open",)
                )
                self._give_back(s, rows)
            return len(rows)

    # -- settlement ----------------------------------------------------------------

    def settle(self, reservation: str | Reservation, usage: Usage) -> SettleResult:
        """Records what the request used, once. Sending it again returns the first
        result with ``duplicate=True`` and changes nothing."""
        return self.settle_many([(reservation, usage)])[0]

    def settle_many(self, items: Sequence[tuple[str | Reservation, Usage]]) -> list[SettleResult]:
        """Batched settle in one transaction; all or nothing."""
        if not items:
            return []
        batch: list[Any] = [
            (item[0].id, item[1])
            if isinstance(item, tuple) and item and isinstance(item[0], Reservation)
            else item
            for item in items
        ]
        with self._session() as s:
            return settle_batch(s, batch, now=self.clock(), price_of=self._price_of)


class _Obj:
    def __init__(self, values: Any) -> None:
        self.__dict__.update(dict(values))
