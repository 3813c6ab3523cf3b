"""Every billing test runs twice: on a fresh SQLite file and on a fresh PostgreSQL
schema (real server at 127.0.0.1:5432, never mocked). PostgreSQL being down is a
failure, not a skip: `scripts/ensure_postgres.sh` starts it before the suite runs."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ember_billing import BillingConfig, BillingService

PG_ADMIN_URL = os.environ.get(
    "EMBER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _pg_admin() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN_URL} does not answer ({exc}); start it with "
            "`bash scripts/ensure_postgres.sh` (billing tests never skip PostgreSQL)"
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A ledger URL nobody else uses: a new SQLite file, or a new PostgreSQL schema
    (``search_path`` set through the connection's options), dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    schema = f"ember_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        base = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


class Clock:
    """A settable clock, so periods, expiry and prices can be tested without sleeping."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += dt.timedelta(**kw)


@pytest.fixture
def clock() -> Clock:
    return Clock(dt.datetime(2026, 12, 10, 12, 0, 0))


@pytest.fixture
def svc(db_url: str, clock: Clock) -> Iterator[BillingService]:
    # Not durable: no fsync per commit (the machine is shared, and fsyncs queue behind
    # a neighbour's disk traffic). Atomicity, isolation and locking are unchanged, and
    # a killed process loses nothing either way; the SIGKILL test's writer and the
    # bench run with the durable default.
    service = BillingService(db_url, clock=clock, config=BillingConfig(durable=False))
    yield service
    service.close()


@pytest.fixture
def world(svc: BillingService) -> dict[str, str]:
    """A tenant with one key, and prices for one model (base and one adapter).

    Prices, micro-units per million tokens: input 1_000_000 (1.00), cached 250_000,
    output 2_000_000; adapter ``ad1`` costs double."""
    t = svc.create_tenant("acme")
    plaintext, key = svc.create_key("acme")
    svc.set_price(
        "m1", input_micros=1_000_000, cached_input_micros=250_000, output_micros=2_000_000
    )
    svc.set_price(
        "m1",
        adapter="ad1",
        input_micros=2_000_000,
        cached_input_micros=500_000,
        output_micros=4_000_000,
    )
    return {"tenant": t.id, "key": key.id, "plaintext": plaintext}
