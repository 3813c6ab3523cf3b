"""API keys (hash only, revocable, expiring), spend caps and tokens per minute."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from ember_billing import BillingService, Usage
from ember_billing.keys import split_key
from ember_billing.models import ApiKey
from ember_core.errors import AuthenticationError, BudgetExceededError, RateLimitError

from .conftest import Clock


def test_key_is_stored_only_as_a_salted_hash(svc: BillingService, world: dict[str, str]) -> None:
    plaintext = world["plaintext"]
    assert plaintext.startswith("ek_")
    assert svc.authenticate(plaintext) == (world["tenant"], world["key"])
    with svc._session() as s:
        row = s.scalars(select(ApiKey)).one()
        secret = plaintext.split("_", 2)[2]
        assert secret not in (row.secret_hash, row.salt, row.prefix)
        assert plaintext.split("_")[1] == row.prefix


@pytest.mark.parametrize("secret", ["_leading", "in_the_middle", "-dash_", "__"])
def test_split_key_keeps_underscores_in_the_secret(secret: str) -> None:
    # token_urlsafe draws '_' in one secret character of 64: a key whose secret
    # starts with '_' must still split into its 8-char prefix and the whole secret.
    assert split_key(f"ek_0123abcd_{secret}") == ("0123abcd", secret)


def test_revoked_and_expired_keys_are_refused(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    info = svc.revoke_key(world["key"])
    assert info.revoked_at is not None
    with pytest.raises(AuthenticationError, match="revoked"):
        svc.authenticate(world["plaintext"])
    with pytest.raises(AuthenticationError, match="revoked"):
        svc.reserve(world["tenant"], world["key"], "m1", "", 1, 1)
    plaintext, _ = svc.create_key("acme", expires_at=clock.now + dt.timedelta(hours=1))
    assert svc.authenticate(plaintext)[0] == world["tenant"]
    clock.advance(hours=2)
    with pytest.raises(AuthenticationError, match="expired"):
        svc.authenticate(plaintext)


def test_spend_cap_refuses_with_what_remains(svc: BillingService, world: dict[str, str]) -> None:
    svc.set_quota(world["tenant"], spend_cap_micros=5000)
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)  # holds 3000
    with pytest.raises(BudgetExceededError) as info:
        svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)
    assert info.value.remaining_micros == 2000 and info.value.http_status == 402
    assert "0.002000 left" in info.value.message
    svc.settle(
        r.id, Usage(prompt_tokens=1000, completion_tokens=0)
    )  # spent 1000, hold gone: 4000 left
    svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)


def test_key_cap_applies_to_its_key_only(svc: BillingService, world: dict[str, str]) -> None:
    _, other = svc.create_key("acme", name="other")
    svc.set_quota(world["tenant"], key=world["key"], spend_cap_micros=1000)
    with pytest.raises(BudgetExceededError, match="key"):
        svc.reserve(world["tenant"], world["key"], "m1", "", 2000, 0)
    svc.reserve(world["tenant"], other.id, "m1", "", 2000, 0)


def test_cap_is_per_calendar_month(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    svc.set_quota(world["tenant"], spend_cap_micros=1000)
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 0)
    svc.settle(r.id, Usage(prompt_tokens=1000, completion_tokens=0))
    with pytest.raises(BudgetExceededError):
        svc.reserve(world["tenant"], world["key"], "m1", "", 1, 0)
    clock.now = dt.datetime(2027, 1, 1, 0, 0, 1)
    svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 0)


def test_tokens_per_minute(svc: BillingService, world: dict[str, str], clock: Clock) -> None:
    svc.set_quota(world["tenant"], key=world["key"], tokens_per_minute=1000)
    clock.now = dt.datetime(2026, 12, 10, 12, 0, 15)
    svc.reserve(world["tenant"], world["key"], "m1", "", 400, 200)
    with pytest.raises(RateLimitError) as info:
        svc.reserve(world["tenant"], world["key"], "m1", "", 300, 200)
    assert info.value.http_status == 429 and 44 < info.value.retry_after_s <= 45
    svc.reserve(world["tenant"], world["key"], "m1", "", 200, 200)  # exactly at the limit
    clock.advance(seconds=60)
    svc.reserve(world["tenant"], world["key"], "m1", "", 500, 500)
