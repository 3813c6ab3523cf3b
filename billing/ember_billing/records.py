"""Plain values the service takes and returns; validated at construction."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from ember_billing.money import check_tokens
from ember_core.errors import InvalidRequestError

_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")
GROUP_KEYS = ("model", "adapter", "key", "day")


def utcnow() -> dt.datetime:
    """Naive UTC: the one time representation the ledger stores."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def as_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def period_of(when: dt.datetime) -> str:
    """The billing period (calendar month, UTC) holding ``when``: ``"2026-12"``."""
    return f"{when.year:04d}-{when.month:02d}"


def check_period(period: object) -> str:
    m = _PERIOD.match(period) if isinstance(period, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise InvalidRequestError(
            f"period must be a calendar month like 2026-12, got {period!r}", param="period"
        )
    return str(period)


def period_end(period: str) -> dt.datetime:
    year, month = (int(x) for x in check_period(period).split("-"))
    return dt.datetime(year + month // 12, month % 12 + 1, 1)


def check_name(name: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > 200:
        raise InvalidRequestError(
            f"{name} must be a non-empty string of at most 200 characters, got {value!r}",
            param=name,
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What a request used. ``cached_tokens`` is the part of ``prompt_tokens`` served
    from the prefix cache, never extra tokens on top of it. Keyword-only: three
    integers in a row are too easy to swap where money depends on them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        check_tokens("prompt_tokens", self.prompt_tokens)
        check_tokens("completion_tokens", self.completion_tokens)
        check_tokens("cached_tokens", self.cached_tokens)
        if self.cached_tokens > self.prompt_tokens:
            raise InvalidRequestError(
                f"cached_tokens ({self.cached_tokens}) exceeds prompt_tokens "
                f"({self.prompt_tokens}): cached prompt tokens are a subset of the prompt",
                param="cached_tokens",
            )


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """One ``reserve`` call's arguments, for ``reserve_many``."""

    tenant_id: str
    key_id: str
    model: str
    adapter: str
    prompt_tokens: int
    max_completion_tokens: int
    request_id: str | None = None

    def __post_init__(self) -> None:
        check_name("tenant", self.tenant_id)
        check_name("key", self.key_id)
        check_name("model", self.model)
        check_name("adapter", self.adapter, allow_empty=True)
        check_tokens("prompt_tokens", self.prompt_tokens)
        check_tokens("max_completion_tokens", self.max_completion_tokens)
        if self.request_id is not None:
            check_name("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    adapter: str
    prompt_tokens: int
    max_completion_tokens: int
    amount_micros: int
    state: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SettleResult:
    """The one answer a request id ever gets: a retry returns the same numbers."""

    request_id: str
    reservation_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    #: This call found the event already recorded and changed nothing.
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    tenant_id: str
    prefix: str
    name: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: str
    name: str
    currency: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of ``usage(...)``; group fields not asked for are ``None``."""

    model: str | None
    adapter: str | None
    key: str | None
    day: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class InvoiceLineView:
    description: str
    model: str
    adapter: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    amount_micros: int


@dataclass(frozen=True, slots=True)
class InvoiceView:
    tenant_id: str
    period: str
    currency: str
    total_micros: int
    #: Final (stored, the period is over) or a draft of a period still running.
    final: bool
    lines: list[InvoiceLineView] = field(default_factory=list)
