"""Metering and ledger: reservations, exactly-once usage, double-entry postings,
budgets and rate limits, invoices. SQLite (WAL) embedded, PostgreSQL by URL."""

from ember_billing.money import Prices, format_micros, parse_amount
from ember_billing.records import (
    InvoiceLineView,
    InvoiceView,
    KeyInfo,
    Reservation,
    ReserveRequest,
    SettleResult,
    TenantInfo,
    Usage,
    UsageRow,
)
from ember_billing.service import BillingConfig, BillingService

__all__ = [
    "BillingConfig",
    "BillingService",
    "InvoiceLineView",
    "InvoiceView",
    "KeyInfo",
    "Prices",
    "Reservation",
    "ReserveRequest",
    "SettleResult",
    "TenantInfo",
    "Usage",
    "UsageRow",
    "format_micros",
    "parse_amount",
]
