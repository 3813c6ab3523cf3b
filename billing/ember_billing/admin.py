"""Tenants, API keys, the price book, quotas, credits and reversals."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ember_billing import ledger, repositories
from ember_billing.keys import generate_key
from ember_billing.models import ApiKey, JournalEntry, Posting, Price, Tenant, UsageEvent
from ember_billing.money import Prices, check_micros, check_tokens
from ember_billing.records import KeyInfo, TenantInfo, as_utc, check_name, period_of
from ember_core.errors import ConflictError, InvalidRequestError, NotFoundError

_CURRENCY = re.compile(r"^[A-Z]{3}$")


def _key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        tenant_id=row.tenant_id,
        prefix=row.prefix,
        name=row.name,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def _tenant_info(row: Tenant) -> TenantInfo:
    return TenantInfo(id=row.id, name=row.name, currency=row.currency, created_at=row.created_at)


class AdminMixin:
    clock: Callable[[], dt.datetime]

    def _session(self, *, snapshot: bool = False) -> Any:  # provided by BillingService
        raise NotImplementedError

    def _tenant(self, s: Any, tenant: str) -> Tenant:
        row = repositories.find_tenant(s, check_name("tenant", tenant))
        if row is None:
            raise NotFoundError(
                f"unknown tenant {tenant!r}; see `ember tenants list`", param="tenant"
            )
        return row

    # -- tenants -------------------------------------------------------------------

    def create_tenant(self, name: str, *, currency: str = "USD") -> TenantInfo:
        check_name("name", name)
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise InvalidRequestError(
                f"currency must be a 3-letter ISO code like USD, got {currency!r}",
                param="currency",
            )
        row = Tenant(id=ledger.new_id(), name=name, currency=currency, created_at=self.clock())
        try:
            with self._session() as s:
                s.add(row)
        except IntegrityError:
            raise ConflictError(
                f"a tenant named {name!r} exists already; pick another name", param="name"
            ) from None
        return _tenant_info(row)

    def get_tenant(self, tenant: str) -> TenantInfo:
        with self._session() as s:
            return _tenant_info(self._tenant(s, tenant))

    def list_tenants(self) -> list[TenantInfo]:
        with self._session() as s:
            return [_tenant_info(t) for t in s.scalars(select(Tenant).order_by(Tenant.name))]

    def set_quota(
        self,
        tenant: str,
        *,
        key: str = "",
        spend_cap_micros: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> None:
        """Spend cap per calendar month and tokens per minute, for the tenant (``key``
        empty) or one key. ``None`` means no limit. Takes effect at once, this period
        included."""
        if spend_cap_micros is not None:
            check_micros("spend_cap_micros", spend_cap_micros)
        if tokens_per_minute is not None:
            check_tokens("tokens_per_minute", tokens_per_minute, minimum=1)
        with self._session() as s:
            t = self._tenant(s, tenant)
            if key:
                k = s.get(ApiKey, key)
                if k is None or k.tenant_id != t.id:
                    raise NotFoundError(f"tenant {tenant!r} has no key {key!r}", param="key")
            repositories.upsert_quota(
                s,
                t.id,
                key,
                spend_cap_micros=spend_cap_micros,
                tokens_per_minute=tokens_per_minute,
            )
            if spend_cap_micros is not None:
                repositories.set_budget_cap(s, t.id, key, period_of(self.clock()), spend_cap_micros)

    # -- keys ----------------------------------------------------------------------

    def create_key(
        self, tenant: str, *, name: str = "default", expires_at: dt.datetime | None = None
    ) -> tuple[str, KeyInfo]:
        """``(plaintext, info)``: the plaintext is shown once and never stored."""
        check_name("name", name)
        new = generate_key()
        with self._session() as s:
            t = self._tenant(s, tenant)
            row = ApiKey(
                id=ledger.new_id(),
                tenant_id=t.id,
                prefix=new.prefix,
                salt=new.salt,
                secret_hash=new.secret_hash,
                name=name,
                created_at=self.clock(),
                expires_at=None if expires_at is None else as_utc(expires_at),
                revoked_at=None,
            )
            s.add(row)
        return new.plaintext, _key_info(row)

    def list_keys(self, tenant: str) -> list[KeyInfo]:
        with self._session() as s:
            t = self._tenant(s, tenant)
            q = select(ApiKey).where(ApiKey.tenant_id == t.id).order_by(ApiKey.created_at)
            return [_key_info(k) for k in s.scalars(q)]

    def revoke_key(self, key: str) -> KeyInfo:
        """By id or prefix (``ek_<prefix>`` accepted too). Revoking twice is a no-op."""
        check_name("key", key)
        prefix = key.removeprefix("ek_").split("_")[0]
        with self._session() as s:
            row = s.get(ApiKey, key) or repositories.find_key_by_prefix(s, prefix)
            if row is None:
                raise NotFoundError(f"no API key {key!r}; see `ember keys list`", param="key")
            repositories.revoke_key(s, row.id, self.clock())
            s.refresh(row)
            return _key_info(row)

    # -- prices --------------------------------------------------------------------

    def set_price(
        self,
        model: str,
        *,
        adapter: str = "",
        input_micros: int,
        cached_input_micros: int,
        output_micros: int,
        effective_from: dt.datetime | None = None,
    ) -> int:
        """Adds a price-book row (micro-units per million tokens); never edits one, so
        requests already reserved keep the price they were reserved at."""
        check_name("model", model)
        check_name("adapter", adapter, allow_empty=True)
        Prices(input_micros, cached_input_micros, output_micros)  # validates
        when = self.clock() if effective_from is None else as_utc(effective_from)
        row = Price(
            model=model,
            adapter=adapter,
            effective_from=when,
            input_micros=input_micros,
            cached_input_micros=cached_input_micros,
            output_micros=output_micros,
        )
        try:
            with self._session() as s:
                s.add(row)
                s.flush()
                return row.id
        except IntegrityError:
            raise ConflictError(
                f"{model}/{adapter or '-'} already has a price effective from {when}; "
                "prices are never edited, add one with a later effective_from",
                param="effective_from",
            ) from None

    def list_prices(self) -> list[dict[str, Any]]:
        with self._session() as s:
            q = select(Price).order_by(Price.model, Price.adapter, Price.effective_from)
            return [
                {
                    "model": p.model,
                    "adapter": p.adapter,
                    "effective_from": p.effective_from.isoformat(),
                    "input_micros": p.input_micros,
                    "cached_input_micros": p.cached_input_micros,
                    "output_micros": p.output_micros,
                }
                for p in s.scalars(q)
            ]

    # -- credits and corrections -----------------------------------------------------

    def credit(self, tenant: str, amount_micros: int, *, reason: str, ref: str) -> str:
        """Credits the tenant (lowers what it owes this period) with a new entry.
        ``ref`` makes it idempotent: the same ref twice is refused, not doubled."""
        check_micros("amount_micros", amount_micros, minimum=1)
        check_name("reason", reason)
        check_name("ref", ref)
        now = self.clock()
        try:
            with self._session() as s:
                t = self._tenant(s, tenant)
                entry = ledger.credit_entry(
                    ref=ref,
                    tenant_id=t.id,
                    period=period_of(now),
                    amount=amount_micros,
                    reason=reason,
                    now=now,
                )
                repositories.insert_rows(s, JournalEntry, [entry.journal])
                repositories.insert_rows(s, Posting, entry.postings)
                return str(entry.journal["id"])
        except IntegrityError:
            raise ConflictError(f"credit {ref!r} was already granted", param="ref") from None

    def reverse_usage(self, request_id: str, *, reason: str) -> str:
        """Reverses a request's charge (its usage event's cost) with a reversing entry
        in the current period, and gives the amount back to the budgets it was counted
        against. The entry's ref is per request, so a second reversal is refused."""
        check_name("request_id", request_id)
        check_name("reason", reason)
        now = self.clock()
        try:
            with self._session() as s:
                ev = s.scalars(
                    select(UsageEvent).where(UsageEvent.request_id == request_id)
                ).first()
                if ev is None:
                    raise NotFoundError(f"no usage recorded for request {request_id!r}")
                if s.get(JournalEntry, ev.journal_id) is None:  # written with the event
                    raise RuntimeError(f"ledger damaged: usage {request_id} has no entry")
                # The request's own charge, not its entry's: usage is journaled per batch.
                entry = ledger.usage_reversal_entry(
                    request_id=request_id,
                    original_id=ev.journal_id,
                    tenant_id=ev.tenant_id,
                    period=period_of(now),
                    cost=ev.cost_micros,
                    reason=reason,
                    now=now,
                )
                repositories.insert_rows(s, JournalEntry, [entry.journal])
                repositories.insert_rows(s, Posting, entry.postings)
                res = repositories.lock_reservations(s, [ev.reservation_id])[ev.reservation_id]
                moves = {
                    bid: (0, -ev.cost_micros)
                    for bid in (res.tenant_budget_id, res.key_budget_id)
                    if bid is not None
                }
                repositories.move_budgets(s, moves)
                return str(entry.journal["id"])
        except IntegrityError:
            raise ConflictError(
                f"the usage of request {request_id!r} was already reversed", param="request_id"
            ) from None
