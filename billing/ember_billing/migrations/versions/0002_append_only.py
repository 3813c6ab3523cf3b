"""ledger tables are append-only: UPDATE and DELETE refused by the database

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

TABLES = ("postings", "journal_entries", "usage_events")
MESSAGE = "is append-only: post a reversing entry instead of editing"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION ember_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '% {MESSAGE}', TG_TABLE_NAME; END $$"
        )
        for t in TABLES:
            op.execute(
                f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} "
                "FOR EACH STATEMENT EXECUTE FUNCTION ember_append_only()"
            )
        return
    for t in TABLES:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {t}_append_only_{verb.lower()} BEFORE {verb} ON {t} "
                f"BEGIN SELECT RAISE(ABORT, '{t} {MESSAGE}'); END"
            )


def downgrade() -> None:
    is_pg = op.get_bind().dialect.name == "postgresql"
    for t in TABLES:
        if is_pg:
            op.execute(f"DROP TRIGGER {t}_append_only ON {t}")
        else:
            for verb in ("update", "delete"):
                op.execute(f"DROP TRIGGER {t}_append_only_{verb}")
    if is_pg:
        op.execute("DROP FUNCTION ember_append_only()")
