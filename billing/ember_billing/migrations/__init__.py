"""Alembic migrations for the ledger, run programmatically (no alembic.ini).

``upgrade_to_head(url)`` is what the service and the tests call; concurrent callers
are serialized (an advisory lock on PostgreSQL, the write lock on SQLite).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from ember_billing.db import make_engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade_to_head(url_or_engine: str | Engine) -> None:
    """Brings the ledger's schema to the newest revision; a no-op when it is there."""
    if isinstance(url_or_engine, str):
        engine = make_engine(url_or_engine, pool_size=1, max_overflow=0)
        try:
            command.upgrade(alembic_config(engine), "head")
        finally:
            engine.dispose()
    else:
        command.upgrade(alembic_config(url_or_engine), "head")
