"""The ledger's tables (SQLAlchemy 2 ORM). The schema itself is owned by the Alembic
migrations in ``migrations/``; these classes must match them (a test compares).

Conventions: money is ``BigInteger`` micro-units; times are naive UTC; ``adapter`` and
``key_id`` use ``""`` for "none" so they can sit in unique constraints on both
PostgreSQL and SQLite (NULLs never collide in a UNIQUE index).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can name what they alter on both dialects.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


Id = String(32)  # uuid4 hex, made by the service so batches need no RETURNING round trip


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class ApiKey(Base):
    """Only a salted hash of the secret is stored; the prefix is what people see."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Price(Base):
    """A price-book row. Rows are only ever added: a new price gets a later
    ``effective_from``, and reservations point at the row they were priced with."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("model", "adapter", "effective_from"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str] = mapped_column(String(200))
    effective_from: Mapped[dt.datetime] = mapped_column(DateTime)
    input_micros: Mapped[int] = mapped_column(BigInteger)
    cached_input_micros: Mapped[int] = mapped_column(BigInteger)
    output_micros: Mapped[int] = mapped_column(BigInteger)


class Quota(Base):
    """Limits configured for a tenant (``key_id == ""``) or for one of its keys."""

    __tablename__ = "quotas"
    __table_args__ = (UniqueConstraint("tenant_id", "key_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    key_id: Mapped[str] = mapped_column(String(32))
    spend_cap_micros: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)


class Budget(Base):
    """One cap's counters for one period. ``spent + reserved <= cap`` is kept by a
    conditional UPDATE, never by reading first (see ``repositories.hold_budget``)."""

    __tablename__ = "budgets"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key_id", "period"),
        CheckConstraint("reserved_micros >= 0", name="reserved_nonneg"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    key_id: Mapped[str] = mapped_column(String(32))
    period: Mapped[str] = mapped_column(String(7))  # "2026-12", calendar month UTC
    cap_micros: Mapped[int] = mapped_column(BigInteger)
    spent_micros: Mapped[int] = mapped_column(BigInteger)
    reserved_micros: Mapped[int] = mapped_column(BigInteger)


class RateWindow(Base):
    """Tokens admitted per scope in one fixed UTC minute."""

    __tablename__ = "rate_windows"
    __table_args__ = (UniqueConstraint("scope", "minute"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(80))
    minute: Mapped[int] = mapped_column(BigInteger)  # unix seconds // 60
    tokens: Mapped[int] = mapped_column(BigInteger)


class Reservation(Base):
    __tablename__ = "reservations"
    # The sweeper's index: open reservations only, so settling one writes no entry.
    __table_args__ = (
        Index(
            "ix_reservations_open_expires",
            "expires_at",
            postgresql_where=text("state = 'open'"),
            sqlite_where=text("state = 'open'"),
        ),
    )
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    # No foreign keys on this hot table: reserve() has just read the key (which
    # belongs to the tenant) and the price row in the same transaction, and a
    # foreign-key check per inserted row costs a lookup each on PostgreSQL.
    tenant_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str] = mapped_column(String(200))
    price_id: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    max_completion_tokens: Mapped[int] = mapped_column(BigInteger)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    tenant_budget_id: Mapped[int | None] = mapped_column(Integer)
    key_budget_id: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(10))  # open | settled | released | expired
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class UsageEvent(Base):
    """What one request used, recorded once: UNIQUE(request_id) makes a retry a no-op."""

    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_events_tenant_period", "tenant_id", "period"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    reservation_id: Mapped[str] = mapped_column(Id)
    journal_id: Mapped[str] = mapped_column(Id)
    tenant_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str] = mapped_column(String(200))
    price_id: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime)
    period: Mapped[str] = mapped_column(String(7))
    day: Mapped[str] = mapped_column(String(10))


class JournalEntry(Base):
    """One business event in the ledger. ``ref`` is unique, so posting the same event
    twice (a retried credit, a second reversal) is refused by the database."""

    __tablename__ = "journal_entries"
    __table_args__ = (Index("ix_journal_entries_tenant_period", "tenant_id", "period"),)
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    ref: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # usage | credit | reversal
    tenant_id: Mapped[str] = mapped_column(String(32))
    period: Mapped[str] = mapped_column(String(7))
    memo: Mapped[str] = mapped_column(String(500))
    reverses_id: Mapped[str | None] = mapped_column(Id)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Posting(Base):
    """One leg of a journal entry. Append-only; the legs of an entry sum to zero."""

    __tablename__ = "postings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    journal_id: Mapped[str] = mapped_column(Id, index=True)
    # No index on account: balances are read by scanning or by journal, never by
    # account alone, and every posting would pay for one.
    account: Mapped[str] = mapped_column(String(100))
    amount_micros: Mapped[int] = mapped_column(BigInteger)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("tenant_id", "period"),)
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    period: Mapped[str] = mapped_column(String(7))
    currency: Mapped[str] = mapped_column(String(3))
    total_micros: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class InvoiceLine(Base):
    __tablename__ = "invoice_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"), index=True)
    description: Mapped[str] = mapped_column(String(300))
    model: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str] = mapped_column(String(200))
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
