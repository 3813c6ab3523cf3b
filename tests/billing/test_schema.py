"""Migrations own the schema: upgrading twice is a no-op, and the ORM models match."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from ember_billing.db import make_engine, session_scope
from ember_billing.migrations import upgrade_to_head
from ember_billing.models import Base


def test_migrations_match_models_and_rerun(db_url: str) -> None:
    upgrade_to_head(db_url)
    upgrade_to_head(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_only_hold_transactions_skip_the_flush_to_disk(db_url: str) -> None:
    """Reservations commit without waiting for the disk; everything else, money included,
    waits for it (see ``session_scope``). Asserted on the live connection's setting."""
    engine = make_engine(db_url)
    postgres = engine.dialect.name == "postgresql"
    probe = text("SHOW synchronous_commit" if postgres else "PRAGMA synchronous")
    flushed, unflushed = ("on", "off") if postgres else (2, 1)  # SQLite: FULL=2, NORMAL=1
    try:
        for hold_only, want in ((False, flushed), (True, unflushed), (False, flushed)):
            with session_scope(engine, hold_only=hold_only) as s:
                assert s.execute(probe).scalar() == want, (hold_only, want)
    finally:
        engine.dispose()
