"""Pricing arithmetic: exact integers, half-up once per event."""

from __future__ import annotations

import pytest

from ember_billing.money import Prices, format_micros, parse_amount, round_half_up_div
from ember_core.errors import InvalidRequestError


def test_round_half_up() -> None:
    assert [round_half_up_div(n, 4) for n in (1, 2, 3, 5, 6, -2)] == [0, 1, 1, 1, 2, -1]


def test_cost_never_exceeds_max_cost() -> None:
    p = Prices(333_333, 444_444, 777_777)
    for prompt in (0, 1, 7, 999):
        for cached in {0, prompt // 2, prompt}:
            for completion in (0, 1, 13):
                cost = p.cost(
                    prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion
                )
                assert 0 <= cost <= p.max_cost(prompt_tokens=prompt, max_completion_tokens=13)


def test_amounts_parse_exactly() -> None:
    assert parse_amount("12.50") == 12_500_000
    assert parse_amount("0.000001") == 1
    assert format_micros(-1_500_001, "USD") == "-1.500001 USD"
    with pytest.raises(InvalidRequestError, match="6 decimals"):
        parse_amount("0.0000001")
    with pytest.raises(InvalidRequestError):
        parse_amount("abc")


def test_config_is_validated_and_rejects_unknown_keys() -> None:
    from ember_billing import BillingConfig
    from ember_core.errors import ConfigError

    assert BillingConfig.from_dict({"reservation_ttl_s": 60}).reservation_ttl_s == 60
    with pytest.raises(ConfigError, match="unknown billing settings"):
        BillingConfig.from_dict({"reservation_ttl": 60})
    with pytest.raises(ConfigError, match="reservation_ttl_s"):
        BillingConfig(reservation_ttl_s=-1)
    with pytest.raises(ConfigError, match="durable"):
        BillingConfig(durable="yes")  # type: ignore[arg-type]


def test_ledger_url_must_be_a_file_or_postgres() -> None:
    from ember_billing.db import make_engine
    from ember_core.errors import ConfigError

    with pytest.raises(ConfigError, match="in-memory"):
        make_engine("sqlite://")
    with pytest.raises(ConfigError, match="mysql"):
        make_engine("mysql://localhost/x")
