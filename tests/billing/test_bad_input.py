"""Bad input gets a clear error and changes nothing: the ledger's totals, the usage
events and the budgets are compared before and after every refused call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ember_billing import BillingService, Usage
from ember_core.errors import (
    AuthenticationError,
    ConflictError,
    EmberError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
)


def snapshot(svc: BillingService, tenant: str) -> tuple[Any, ...]:
    from sqlalchemy import select

    from ember_billing.models import Budget, Reservation

    with svc._session() as s:
        budgets = sorted(
            (b.id, b.spent_micros, b.reserved_micros) for b in s.scalars(select(Budget))
        )
        states = sorted((r.id, r.state) for r in s.scalars(select(Reservation)))
    return svc.ledger_totals(), svc.usage(tenant, "2026-12", group_by=("model",)), budgets, states


def u(prompt: Any, completion: Any, cached: Any = 0) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)


@pytest.fixture
def seeded(svc: BillingService, world: dict[str, str]) -> dict[str, str]:
    svc.set_quota(world["tenant"], spend_cap_micros=10_000_000)
    done = svc.reserve(world["tenant"], world["key"], "m1", "", 100, 100)
    svc.settle(done.id, Usage(prompt_tokens=100, completion_tokens=50, cached_tokens=10))
    released = svc.reserve(world["tenant"], world["key"], "m1", "", 100, 100)
    svc.release(released.id)
    open_ = svc.reserve(world["tenant"], world["key"], "m1", "", 100, 100)
    return {**world, "released": released.id, "open": open_.id}


CASES: list[tuple[str, type[EmberError], str, Callable[[BillingService, dict[str, str]], Any]]] = [
    ("negative prompt", InvalidRequestError, "prompt_tokens",
     lambda s, w: s.reserve(w["tenant"], w["key"], "m1", "", -1, 10)),
    ("float prompt", InvalidRequestError, "whole number",
     lambda s, w: s.reserve(w["tenant"], w["key"], "m1", "", 10.5, 10)),
    ("bool completion", InvalidRequestError, "whole number",
     lambda s, w: s.reserve(w["tenant"], w["key"], "m1", "", 10, True)),
    ("string tokens", InvalidRequestError, "whole number",
     lambda s, w: s.reserve(w["tenant"], w["key"], "m1", "", "10", 10)),
    ("negative completion usage", InvalidRequestError, "completion_tokens",
     lambda s, w: s.settle(w["open"], u(10, -3))),
    ("float usage", InvalidRequestError, "whole number",
     lambda s, w: s.settle(w["open"], u(10, 3.0))),
    ("cached > prompt", InvalidRequestError, "subset",
     lambda s, w: s.settle(w["open"], u(10, 3, 11))),
    ("usage not a Usage", InvalidRequestError, "Usage",
     lambda s, w: s.settle(w["open"], {"prompt_tokens": 1})),
    ("unknown tenant", NotFoundError, "unknown tenant",
     lambda s, w: s.reserve("no-such-tenant", w["key"], "m1", "", 10, 10)),
    ("key of no tenant", AuthenticationError, "does not belong",
     lambda s, w: s.reserve(w["tenant"], "no-such-key", "m1", "", 10, 10)),
    ("unknown model", ModelNotFoundError, "no price for model 'm9'",
     lambda s, w: s.reserve(w["tenant"], w["key"], "m9", "", 10, 10)),
    ("unknown reservation", NotFoundError, "no reservation",
     lambda s, w: s.settle("f" * 32, u(1, 1))),
    ("unknown reservation in a batch", NotFoundError, "no reservation",
     lambda s, w: s.settle_many([(w["open"], u(1, 1)), ("f" * 32, u(1, 1))])),
    ("release unknown", NotFoundError, "no reservation",
     lambda s, w: s.release("nope")),
    ("settle after release", ConflictError, "released",
     lambda s, w: s.settle(w["released"], u(10, 10))),
    ("batch with one released", ConflictError, "released",
     lambda s, w: s.settle_many([(w["open"], u(1, 1)), (w["released"], u(1, 1))])),
    ("float credit", InvalidRequestError, "never pass money as a float",
     lambda s, w: s.credit(w["tenant"], 1.5, reason="x", ref="r")),
    ("zero credit", InvalidRequestError, "amount_micros",
     lambda s, w: s.credit(w["tenant"], 0, reason="x", ref="r")),
    ("float cap", InvalidRequestError, "float",
     lambda s, w: s.set_quota(w["tenant"], spend_cap_micros=2.5)),
    ("float price", InvalidRequestError, "float",
     lambda s, w: s.set_price("m2", input_micros=0.1, cached_input_micros=0, output_micros=0)),
    ("negative price", InvalidRequestError, "between 0",
     lambda s, w: s.set_price("m2", input_micros=-1, cached_input_micros=0, output_micros=0)),
    ("bad period", InvalidRequestError, "calendar month",
     lambda s, w: s.usage(w["tenant"], "2026-13")),
    ("reverse unknown request", NotFoundError, "no usage",
     lambda s, w: s.reverse_usage("never-ran", reason="x")),
    ("malformed key", AuthenticationError, "malformed",
     lambda s, w: s.authenticate("sk-123")),
    ("wrong secret", AuthenticationError, "unknown API key",
     lambda s, w: s.authenticate(w["plaintext"][:-2] + "xx")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "exc", "match", "call"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing(
    svc: BillingService,
    seeded: dict[str, str],
    name: str,
    exc: type[EmberError],
    match: str,
    call: Callable[[BillingService, dict[str, str]], Any],
) -> None:
    before = snapshot(svc, seeded["tenant"])
    with pytest.raises(exc, match=match) as info:
        call(svc, seeded)
    assert info.value.http_status in (400, 401, 404, 409)
    assert snapshot(svc, seeded["tenant"]) == before
    assert svc.check_ledger() == []
