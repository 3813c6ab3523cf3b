"""Alembic environment: runs on the engine handed over in ``config.attributes``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, text

from ember_billing.models import Base

# Any 64-bit number unique to this purpose: concurrent upgraders wait on it.
_PG_MIGRATION_LOCK = 0x656D626572_01


def run_migrations_online() -> None:
    engine = context.config.attributes.get("engine")
    if not isinstance(engine, Engine):
        raise RuntimeError("call ember_billing.migrations.upgrade_to_head(url), not alembic")
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=True
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
            context.run_migrations()


run_migrations_online()
