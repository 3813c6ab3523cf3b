"""Exact money: integer micro-units of a currency, and the one pricing formula.

Prices are integer micro-units per million tokens, so a price of ``150_000`` is
0.15 per million tokens. An event's cost is

    (uncached_prompt * input + cached * cached_input + completion * output) / 1e6

computed exactly as an integer numerator and rounded half-up **once per event**, at
the end. Rounding per token class (or per token) would let a tenant's bill drift from
the sum of its events; rounding once keeps each event within half a micro-unit of
the exact price and the ledger equal to the sum of the events it holds.

Cached prompt tokens are a subset of the prompt tokens: they are priced at the cached
rate and the rest at the input rate, so no token is priced twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ember_core.errors import InvalidRequestError

MICROS_PER_UNIT = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
#: Bigger counts are surely a bug (no request has 2**40 tokens) and would overflow BIGINT.
MAX_TOKENS = 2**40
MAX_MICROS = 2**62


def check_tokens(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as a token count, or a clear error: ints only (bool and float refused)."""
    if type(value) is int and minimum <= value <= MAX_TOKENS:  # the common case, fast
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(
            f"{name} must be a whole number of tokens, got {value!r} ({type(value).__name__})",
            param=name,
        )
    if value < minimum or value > MAX_TOKENS:
        raise InvalidRequestError(
            f"{name} must be between {minimum} and {MAX_TOKENS}, got {value}", param=name
        )
    return value


def check_micros(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as integer micro-units. Floats are refused: money is never a float."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(
            f"{name} must be an integer number of micro-units (1 = 0.000001 of the currency), "
            f"got {value!r} ({type(value).__name__}); never pass money as a float",
            param=name,
        )
    if value < minimum or value > MAX_MICROS:
        raise InvalidRequestError(
            f"{name} must be between {minimum} and {MAX_MICROS} micro-units, got {value}",
            param=name,
        )
    return value


def parse_amount(text: str, *, name: str = "amount") -> int:
    """``"12.50"`` -> ``12_500_000`` micro-units, exactly; more than 6 decimals is an error."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidRequestError(
            f"{name} must be a decimal amount like 12.50, got {text!r}", param=name
        ) from None
    if not value.is_finite():
        raise InvalidRequestError(f"{name} must be a finite amount, got {text!r}", param=name)
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise InvalidRequestError(
            f"{name} has more than 6 decimals ({text!r}); the smallest unit is 0.000001",
            param=name,
        )
    return int(micros)


def format_micros(micros: int, currency: str = "") -> str:
    """``12_500_000`` -> ``"12.500000"`` (with the currency code after, if given)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    text = f"{sign}{whole}.{frac:06d}"
    return f"{text} {currency}" if currency else text


def round_half_up_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half away from zero, in integers only."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    q, r = divmod(abs(numerator), denominator)
    if 2 * r >= denominator:
        q += 1
    return q if numerator >= 0 else -q


@dataclass(frozen=True, slots=True)
class Prices:
    """One price-book row's rates, micro-units per million tokens."""

    input_micros: int
    cached_input_micros: int
    output_micros: int

    def __post_init__(self) -> None:
        check_micros("input price", self.input_micros)
        check_micros("cached input price", self.cached_input_micros)
        check_micros("output price", self.output_micros)

    def cost(self, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """The exact cost of one event, in micro-units (see the module's rounding note)."""
        if not 0 <= cached_tokens <= prompt_tokens:
            raise InvalidRequestError(
                f"cached_tokens ({cached_tokens}) must be between 0 and prompt_tokens "
                f"({prompt_tokens}): cached prompt tokens are a subset of the prompt",
                param="cached_tokens",
            )
        numerator = (
            (prompt_tokens - cached_tokens) * self.input_micros
            + cached_tokens * self.cached_input_micros
            + completion_tokens * self.output_micros
        )
        return round_half_up_div(numerator, TOKENS_PER_PRICE_UNIT)

    def max_cost(self, *, prompt_tokens: int, max_completion_tokens: int) -> int:
        """The most a request can cost: what a reservation holds. Every prompt token is
        priced at the dearer of the two input rates, so any later cached count fits."""
        dearer = max(self.input_micros, self.cached_input_micros)
        numerator = prompt_tokens * dearer + max_completion_tokens * self.output_micros
        return round_half_up_div(numerator, TOKENS_PER_PRICE_UNIT)
