"""reservations: the sweeper's index covers open reservations only

Revision ID: 0003
Revises: 0002

``(state, expires_at)`` got a new entry every time a reservation changed state, so
settling one wrote an index entry nobody reads. A partial index on ``expires_at``
``WHERE state = 'open'`` serves the sweeper alike; settling only drops the entry.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

OPEN = "state = 'open'"


def upgrade() -> None:
    op.drop_index("ix_reservations_state_expires", table_name="reservations")
    op.create_index(
        "ix_reservations_open_expires",
        "reservations",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_reservations_open_expires", table_name="reservations")
    op.create_index(
        "ix_reservations_state_expires", "reservations", ["state", "expires_at"], unique=False
    )
