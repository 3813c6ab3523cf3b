"""`ember tenants | keys | prices | usage | invoice` through main(), on the default
SQLite ledger under --home and on a fresh PostgreSQL schema via --ledger-url."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ember_billing import BillingService, Usage
from ember_billing.keys import split_key
from ember_platform.cli import main

PG = os.environ.get("EMBER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """Extra CLI arguments naming the ledger; ``[]`` means the default under --home."""
    if request.param == "sqlite":
        yield []
        return
    schema = f"ember_cli_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG} does not answer ({exc}); run scripts/ensure_postgres.sh")
    admin.execute(f'CREATE SCHEMA "{schema}"')
    base = PG.replace("postgresql://", "postgresql+psycopg://", 1)
    yield ["--ledger-url", f"{base}?options=-csearch_path%3D{schema}"]
    admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    admin.close()


def run(home: Path, ledger: list[str], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # --ledger-url belongs to the leaf command, so it goes last.
    code = main(["--home", str(home), *argv, *ledger], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_tenant_key_usage_invoice_round_trip(tmp_path: Path, ledger: list[str]) -> None:
    code, out, _ = run(tmp_path, ledger, "tenants", "create", "acme", "--spend-cap", "25.00")
    assert code == 0 and "created tenant acme" in out
    code, out, err = run(tmp_path, ledger, "keys", "create", "acme", "--name", "ci")
    plaintext = out.strip()
    assert code == 0 and plaintext.startswith("ek_") and "shown once" in err
    assert run(tmp_path, ledger, "prices", "set", "m1", "--input", "1.00", "--output", "2")[0] == 0

    url = ledger[1] if ledger else f"sqlite:///{tmp_path / 'ledger.db'}"
    with BillingService(url) as svc:
        tenant, key = svc.authenticate(plaintext)
        r = svc.reserve(tenant, key, "m1", "", 1_000_000, 1000)
        svc.settle(r.id, Usage(prompt_tokens=1_000_000, completion_tokens=1000, cached_tokens=0))
        period = svc.clock().strftime("%Y-%m")

    code, out, _ = run(tmp_path, ledger, "usage", "acme", "--group-by", "model,key")
    assert code == 0 and "m1" in out and "1000000" in out and "1.002000" in out
    code, out, _ = run(tmp_path, ledger, "usage", "acme", "--json")
    [row] = json.loads(out)
    assert row["cost_micros"] == 1_002_000 and row["completion_tokens"] == 1000
    code, out, _ = run(tmp_path, ledger, "invoice", "acme", "--period", period)
    assert code == 0 and "draft" in out and "1.002000 USD" in out
    inv = json.loads(run(tmp_path, ledger, "invoice", "acme", "--json")[1])
    assert inv["total_micros"] == 1_002_000 and inv["lines"][0]["model"] == "m1"

    keys = json.loads(run(tmp_path, ledger, "keys", "list", "acme", "--json")[1])
    _, secret = split_key(plaintext)
    assert len(keys) == 1 and secret not in json.dumps(keys)
    assert run(tmp_path, ledger, "keys", "revoke", keys[0]["id"])[0] == 0
    code, out, _ = run(tmp_path, ledger, "keys", "list", "acme")
    assert "revoked" in out and plaintext not in out
    tenants = json.loads(run(tmp_path, ledger, "tenants", "list", "--json")[1])
    assert [t["name"] for t in tenants] == ["acme"]


def test_cli_errors_are_clear(tmp_path: Path, ledger: list[str]) -> None:
    code, _, err = run(tmp_path, ledger, "usage", "nobody")
    assert code == 2 and "unknown tenant 'nobody'" in err
    run(tmp_path, ledger, "tenants", "create", "acme")
    code, _, err = run(tmp_path, ledger, "tenants", "create", "acme")
    assert code == 2 and "exists already" in err
    code, _, err = run(tmp_path, ledger, "tenants", "set-quota", "acme", "--spend-cap", "1.0000001")
    assert code == 2 and "6 decimals" in err
    code, _, err = run(tmp_path, ledger, "invoice", "acme", "--period", "2026-1")
    assert code == 2 and "calendar month" in err
    code, _, err = run(tmp_path, ledger, "usage", "acme", "--group-by", "colour")
    assert code == 2 and "cannot group" in err


def test_ledger_url_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("EMBER_LEDGER_URL", url)
    assert run(tmp_path, [], "tenants", "create", "envco")[0] == 0
    assert (tmp_path / "elsewhere.db").exists() and not (tmp_path / "ledger.db").exists()
