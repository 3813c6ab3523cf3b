"""Migrations own the schema: upgrading twice is a no-op, and the ORM models match."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ember_billing.db import make_engine
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
