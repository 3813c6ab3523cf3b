"""Reading the ledger: usage by group, invoices, and the ledger's own health check."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ember_billing import ledger, repositories
from ember_billing.models import Invoice, InvoiceLine, JournalEntry, Posting, Tenant, UsageEvent
from ember_billing.records import (
    GROUP_KEYS,
    InvoiceLineView,
    InvoiceView,
    UsageRow,
    check_period,
    period_end,
    period_of,
)
from ember_core.errors import InvalidRequestError

_COLUMNS = {
    "model": UsageEvent.model,
    "adapter": UsageEvent.adapter,
    "key": UsageEvent.key_id,
    "day": UsageEvent.day,
}


def _sums() -> list[Any]:
    return [
        func.count(UsageEvent.id),
        func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
        func.coalesce(func.sum(UsageEvent.cached_tokens), 0),
        func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
        func.coalesce(func.sum(UsageEvent.cost_micros), 0),
    ]


def account_balances(session: Session, accounts: Sequence[str] | None = None) -> dict[str, int]:
    q = select(Posting.account, func.sum(Posting.amount_micros)).group_by(Posting.account)
    if accounts is not None:
        q = q.where(Posting.account.in_(accounts))
    return {a: int(s) for a, s in session.execute(q)}


def unbalanced_journals(session: Session) -> list[tuple[str, int]]:
    q = (
        select(Posting.journal_id, func.sum(Posting.amount_micros))
        .group_by(Posting.journal_id)
        .having(func.sum(Posting.amount_micros) != 0)
    )
    return [(str(j), int(t)) for j, t in session.execute(q)]


def tenant_period_total(session: Session, tenant_id: str, period: str, account: str) -> int:
    q = (
        select(func.coalesce(func.sum(Posting.amount_micros), 0))
        .join(JournalEntry, JournalEntry.id == Posting.journal_id)
        .where(
            and_(
                JournalEntry.tenant_id == tenant_id,
                JournalEntry.period == period,
                Posting.account == account,
            )
        )
    )
    return int(session.execute(q).scalar_one())


def journal_amount(session: Session, journal_id: str, account: str) -> int:
    q = select(func.coalesce(func.sum(Posting.amount_micros), 0)).where(
        Posting.journal_id == journal_id, Posting.account == account
    )
    return int(session.execute(q).scalar_one())


def usage_journal_mismatches(session: Session) -> list[str]:
    """Usage entries that do not charge exactly the sum of their usage events' costs
    to the events' tenant, events whose entry is missing or not a usage entry, and
    usage entries without events. Usage is journaled per settled batch (one entry
    per tenant and batch), so this is what ties each request's exact charge, its
    event's ``cost_micros``, to the double-entry ledger."""
    problems = []
    charged = (
        select(Posting.journal_id, func.sum(Posting.amount_micros).label("amount"))
        .where(Posting.amount_micros > 0)
        .group_by(Posting.journal_id)
        .subquery()
    )
    events = (
        select(
            UsageEvent.journal_id,
            UsageEvent.tenant_id,
            func.count(UsageEvent.id).label("n"),
            func.sum(UsageEvent.cost_micros).label("cost"),
        )
        .group_by(UsageEvent.journal_id, UsageEvent.tenant_id)
        .subquery()
    )
    q = (
        select(
            events.c.journal_id,
            events.c.tenant_id,
            events.c.n,
            events.c.cost,
            JournalEntry.tenant_id,
            JournalEntry.kind,
            charged.c.amount,
        )
        .outerjoin(JournalEntry, JournalEntry.id == events.c.journal_id)
        .outerjoin(charged, charged.c.journal_id == events.c.journal_id)
    )
    for jid, tenant, n, cost, entry_tenant, kind, amount in session.execute(q):
        if kind != "usage":
            problems.append(f"{n} usage events point at {jid}, which is not a usage entry")
        elif entry_tenant != tenant:
            problems.append(f"usage entry {jid} of {entry_tenant} holds events of {tenant}")
        elif int(amount or 0) != int(cost):
            problems.append(f"usage entry {jid} charges {amount} but its {n} events cost {cost}")
    orphans = (
        select(JournalEntry.ref)
        .outerjoin(UsageEvent, UsageEvent.journal_id == JournalEntry.id)
        .where(JournalEntry.kind == "usage", UsageEvent.id.is_(None))
    )
    problems.extend(f"usage entry {ref} has no usage event" for (ref,) in session.execute(orphans))
    return problems


class ReportsMixin:
    clock: Callable[[], dt.datetime]

    def _session(self, *, snapshot: bool = False) -> Any:  # provided by BillingService
        raise NotImplementedError

    def _tenant(self, s: Any, tenant: str) -> Tenant:  # provided by AdminMixin
        raise NotImplementedError

    def usage(
        self, tenant: str, period: str | None = None, group_by: Sequence[str] = ("model",)
    ) -> list[UsageRow]:
        """Tokens and cost of the tenant's requests in ``period`` (default: this
        month), grouped by any of model, adapter, key and day."""
        period = check_period(period) if period is not None else period_of(self.clock())
        if isinstance(group_by, str):
            group_by = (group_by,)
        bad = [g for g in group_by if g not in GROUP_KEYS]
        if bad:
            raise InvalidRequestError(
                f"cannot group usage by {bad}; choose from {list(GROUP_KEYS)}", param="group_by"
            )
        groups = list(dict.fromkeys(group_by))
        cols = [_COLUMNS[g] for g in groups]
        with self._session() as s:
            t = self._tenant(s, tenant)
            q = (
                select(*cols, *_sums())
                .where(UsageEvent.tenant_id == t.id, UsageEvent.period == period)
                .group_by(*cols)
                .order_by(*cols)
            )
            out = []
            for row in s.execute(q):
                named = dict(zip(groups, row[: len(groups)], strict=True))
                n, p, c, o, cost = (int(x) for x in row[len(groups) :])
                if n == 0:
                    continue
                out.append(
                    UsageRow(
                        model=named.get("model"),
                        adapter=named.get("adapter"),
                        key=named.get("key"),
                        day=named.get("day"),
                        requests=n,
                        prompt_tokens=p,
                        cached_tokens=c,
                        completion_tokens=o,
                        cost_micros=cost,
                    )
                )
            return out

    def invoice(self, tenant: str, period: str | None = None) -> InvoiceView:
        """One line per model and adapter, plus one per credit or reversal. A period
        that has ended is invoiced once and stored; later calls return that invoice.
        The running period gets a draft. The total always equals the movement of the
        tenant's receivable account in the period (checked)."""
        period = check_period(period) if period is not None else period_of(self.clock())
        now = self.clock()
        with self._session(snapshot=True) as s:
            t = self._tenant(s, tenant)
            stored = s.scalars(
                select(Invoice).where(Invoice.tenant_id == t.id, Invoice.period == period)
            ).first()
            if stored is not None:
                return self._stored_invoice(s, stored)
            lines = self._invoice_lines(s, t.id, period)
            total = sum(line.amount_micros for line in lines)
            posted = tenant_period_total(s, t.id, period, ledger.receivable(t.id))
            if total != posted:
                raise RuntimeError(
                    f"ledger inconsistency for {t.name} {period}: lines sum to {total}, "
                    f"receivable moved {posted}"
                )
            final = now >= period_end(period)
            view = InvoiceView(t.id, period, t.currency, total, final, lines)
            if final:
                self._store_invoice(s, view, now)
            return view

    @staticmethod
    def _invoice_lines(s: Any, tenant_id: str, period: str) -> list[InvoiceLineView]:
        q = (
            select(UsageEvent.model, UsageEvent.adapter, *_sums())
            .where(UsageEvent.tenant_id == tenant_id, UsageEvent.period == period)
            .group_by(UsageEvent.model, UsageEvent.adapter)
            .order_by(UsageEvent.model, UsageEvent.adapter)
        )
        lines = [
            InvoiceLineView(
                f"{m}{' + ' + a if a else ''}", m, a, int(n), int(p), int(c), int(o), int(cost)
            )
            for m, a, n, p, c, o, cost in s.execute(q)
            if int(n)
        ]
        adjustments = s.execute(
            select(JournalEntry.kind, JournalEntry.memo, JournalEntry.id)
            .where(
                JournalEntry.tenant_id == tenant_id,
                JournalEntry.period == period,
                JournalEntry.kind != "usage",
            )
            .order_by(JournalEntry.created_at, JournalEntry.id)
        ).all()
        account = ledger.receivable(tenant_id)
        for kind, memo, jid in adjustments:
            amount = journal_amount(s, jid, account)
            lines.append(InvoiceLineView(f"{kind}: {memo}", "", "", 0, 0, 0, 0, amount))
        return lines

    @staticmethod
    def _store_invoice(s: Any, view: InvoiceView, now: dt.datetime) -> None:
        inv_id = ledger.new_id()
        try:
            with s.begin_nested():
                s.add(
                    Invoice(
                        id=inv_id,
                        tenant_id=view.tenant_id,
                        period=view.period,
                        currency=view.currency,
                        total_micros=view.total_micros,
                        created_at=now,
                    )
                )
                s.flush()
                repositories.insert_rows(
                    s,
                    InvoiceLine,
                    [
                        {
                            "invoice_id": inv_id,
                            "description": ln.description,
                            "model": ln.model,
                            "adapter": ln.adapter,
                            "requests": ln.requests,
                            "prompt_tokens": ln.prompt_tokens,
                            "cached_tokens": ln.cached_tokens,
                            "completion_tokens": ln.completion_tokens,
                            "amount_micros": ln.amount_micros,
                        }
                        for ln in view.lines
                    ],
                )
        except IntegrityError:
            pass  # a concurrent call stored the same invoice first; same numbers

    @staticmethod
    def _stored_invoice(s: Any, inv: Invoice) -> InvoiceView:
        rows = s.scalars(
            select(InvoiceLine).where(InvoiceLine.invoice_id == inv.id).order_by(InvoiceLine.id)
        )
        lines = [
            InvoiceLineView(
                r.description,
                r.model,
                r.adapter,
                r.requests,
                r.prompt_tokens,
                r.cached_tokens,
                r.completion_tokens,
                r.amount_micros,
            )
            for r in rows
        ]
        return InvoiceView(inv.tenant_id, inv.period, inv.currency, inv.total_micros, True, lines)

    def ledger_totals(self) -> dict[str, int]:
        """Balance of every account; they sum to zero."""
        with self._session() as s:
            return account_balances(s)

    def check_ledger(self) -> list[str]:
        """Problems found (empty when healthy): unbalanced entries, usage events
        without their entry or the reverse, amounts that disagree."""
        problems: list[str] = []
        with self._session(snapshot=True) as s:
            for jid, total in unbalanced_journals(s):
                problems.append(f"journal entry {jid} sums to {total}, not 0")
            problems.extend(usage_journal_mismatches(s))
        return problems
