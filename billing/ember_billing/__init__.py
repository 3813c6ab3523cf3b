"""Metering and ledger (lands with the billing issue)."""
