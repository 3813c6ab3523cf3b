"""``ember tenants | keys | prices | usage | invoice``: the ledger from the command line.

The ledger is ``--ledger-url``, else ``$EMBER_LEDGER_URL``, else the SQLite file
``<ember home>/ledger.db``. Amounts are typed and shown as decimals of the currency
(``12.50``) and kept as integer micro-units inside. ``--json`` prints what machines
read; the default is a table for people.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from ember_core.errors import InvalidRequestError

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]


def ledger_url(args: argparse.Namespace) -> str:
    if getattr(args, "ledger_url", None):
        return str(args.ledger_url)
    if os.environ.get("EMBER_LEDGER_URL"):
        return os.environ["EMBER_LEDGER_URL"]
    from ember_weights_store import default_home

    home = Path(args.home) if getattr(args, "home", None) else default_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'ledger.db'}"


def _service(args: argparse.Namespace) -> Any:
    from ember_billing import BillingService

    return BillingService(ledger_url(args))


def _amount(text: str | None, name: str) -> int | None:
    """``"12.50"`` -> micro-units; ``"none"`` (or absent) -> no limit."""
    from ember_billing import parse_amount

    if text is None or text.lower() == "none":
        return None
    micros = parse_amount(text, name=name)
    if micros < 0:
        raise InvalidRequestError(f"{name} must not be negative, got {text}")
    return micros


def _table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Left-aligned text, right-aligned numbers, one space-padded column each."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(r[i], int) or _is_amount(r[i]) for r in rows) for i in range(len(headers))
    ]
    for n, row in enumerate(cells):
        line = "  ".join(
            c.rjust(w) if numeric[i] and n else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print(line.rstrip(), file=out)


def _is_amount(value: object) -> bool:
    return isinstance(value, str) and value.replace("-", "").replace(".", "").isdigit()


def _json(out: TextIO, value: object) -> None:
    def default(o: object) -> object:
        if isinstance(o, dt.datetime):
            return o.isoformat()
        raise TypeError(type(o).__name__)

    print(json.dumps(value, indent=2, default=default), file=out)


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"


# -- handlers ---------------------------------------------------------------------


def cmd_tenants_create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _service(args) as svc:
        t = svc.create_tenant(args.name, currency=args.currency)
        cap, tpm = _amount(args.spend_cap, "--spend-cap"), args.tpm
        if cap is not None or tpm is not None:
            svc.set_quota(t.id, spend_cap_micros=cap, tokens_per_minute=tpm)
    if args.json:
        _json(out, asdict(t))
    else:
        print(f"created tenant {t.name} ({t.id}), currency {t.currency}", file=out)
    return 0


def cmd_tenants_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _service(args) as svc:
        tenants = svc.list_tenants()
    if args.json:
        _json(out, [asdict(t) for t in tenants])
    else:
        _table(
            out,
            ["name", "id", "currency", "created"],
            [[t.name, t.id, t.currency, _when(t.created_at)] for t in tenants],
        )
    return 0


def cmd_tenants_set_quota(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cap = _amount(args.spend_cap, "--spend-cap")
    tpm = None if args.tpm in (None, "none") else _positive_int(args.tpm, "--tpm")
    with _service(args) as svc:
        svc.set_quota(args.tenant, key=args.key or "", spend_cap_micros=cap, tokens_per_minute=tpm)
    scope = f"key {args.key}" if args.key else f"tenant {args.tenant}"
    print(
        f"{scope}: spend cap {args.spend_cap or 'none'} per month, "
        f"{tpm if tpm is not None else 'no'} tokens-per-minute limit",
        file=out,
    )
    return 0


def _positive_int(text: str, name: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise InvalidRequestError(f"{name} must be a positive whole number, got {text!r}")
    return int(text)


def cmd_keys_create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    expires = None
    if args.expires_days is not None:
        if args.expires_days <= 0:
            raise InvalidRequestError(f"--expires-days must be positive, got {args.expires_days}")
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_days)
    with _service(args) as svc:
        plaintext, info = svc.create_key(args.tenant, name=args.name, expires_at=expires)
    if args.json:
        _json(out, {"api_key": plaintext, **asdict(info)})
    else:
        print(plaintext, file=out)
        print(
            f"key {info.id} (ek_{info.prefix}_...) for tenant {info.tenant_id}; the key is "
            "shown once, store it now",
            file=err,
        )
    return 0


def cmd_keys_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _service(args) as svc:
        keys = svc.list_keys(args.tenant)
    if args.json:
        _json(out, [asdict(k) for k in keys])
        return 0
    rows = []
    for k in keys:
        state = "revoked" if k.revoked_at else "active"
        rows.append(
            [f"ek_{k.prefix}_...", k.name, k.id, state, _when(k.created_at), _when(k.expires_at)]
        )
    _table(out, ["key", "name", "id", "state", "created", "expires"], rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _service(args) as svc:
        info = svc.revoke_key(args.key)
    print(f"revoked ek_{info.prefix}_... ({info.id})", file=out)
    return 0


def cmd_prices_set(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rates = {
        name: _amount(getattr(args, name), f"--{name.replace('_', '-')}")
        for name in ("input", "cached_input", "output")
    }
    input_micros = rates["input"] or 0
    cached = rates["cached_input"]
    with _service(args) as svc:
        svc.set_price(
            args.model,
            adapter=args.adapter or "",
            input_micros=input_micros,
            cached_input_micros=input_micros if cached is None else cached,
            output_micros=rates["output"] or 0,
        )
    print(
        f"priced {args.model}{'/' + args.adapter if args.adapter else ''} per 1M tokens", file=out
    )
    return 0


def cmd_prices_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_billing import format_micros

    with _service(args) as svc:
        prices = svc.list_prices()
    if args.json:
        _json(out, prices)
        return 0
    rows = [
        [
            p["model"],
            p["adapter"] or "-",
            p["effective_from"][:16],
            format_micros(p["input_micros"]),
            format_micros(p["cached_input_micros"]),
            format_micros(p["output_micros"]),
        ]
        for p in prices
    ]
    _table(out, ["model", "adapter", "from", "input/1M", "cached/1M", "output/1M"], rows)
    return 0


def cmd_usage(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_billing import format_micros

    group_by = [g for g in args.group_by.split(",") if g] if args.group_by else []
    with _service(args) as svc:
        rows = svc.usage(args.tenant, args.period, group_by=group_by)
    if args.json:
        _json(out, [asdict(r) for r in rows])
        return 0
    table = [
        [
            *(getattr(r, g) or "-" for g in group_by),
            r.requests,
            r.prompt_tokens,
            r.cached_tokens,
            r.completion_tokens,
            format_micros(r.cost_micros),
        ]
        for r in rows
    ]
    headers = [*group_by, "requests", "prompt", "cached", "completion", "cost"]
    _table(out, headers, table)
    return 0


def cmd_invoice(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_billing import format_micros

    with _service(args) as svc:
        inv = svc.invoice(args.tenant, args.period)
    if args.json:
        _json(out, asdict(inv))
        return 0
    status = "final" if inv.final else "draft, period still open"
    print(f"invoice {inv.period} for tenant {inv.tenant_id} ({status})", file=out)
    rows = [
        [
            ln.description,
            ln.requests,
            ln.prompt_tokens,
            ln.cached_tokens,
            ln.completion_tokens,
            format_micros(ln.amount_micros),
        ]
        for ln in inv.lines
    ]
    rows.append(["total", "", "", "", "", format_micros(inv.total_micros, inv.currency)])
    _table(out, ["line", "requests", "prompt", "cached", "completion", "amount"], rows)
    return 0


# -- parser -------------------------------------------------------------------------


def _leaf(
    sub: Any, name: str, handler: Handler, help_text: str, *, json_flag: bool = True
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    p.add_argument("--ledger-url", default=None, help="ledger database (env EMBER_LEDGER_URL)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(billing_handler=handler)
    return p


def register(subparsers: Any) -> None:
    """Adds the billing commands to the ``ember`` parser's subcommands. Each leaf sets
    ``billing_handler``; ``ember_platform.cli.main`` calls it."""
    tenants = subparsers.add_parser("tenants", help="tenants and their quotas").add_subparsers(
        dest="tenants_command", required=True
    )
    p = _leaf(tenants, "create", cmd_tenants_create, "create a tenant")
    p.add_argument("name")
    p.add_argument("--currency", default="USD")
    p.add_argument("--spend-cap", default=None, help="per calendar month, e.g. 25.00")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    _leaf(tenants, "list", cmd_tenants_list, "list tenants")
    p = _leaf(
        tenants, "set-quota", cmd_tenants_set_quota, "spend cap and rate limit", json_flag=False
    )
    p.add_argument("tenant", help="name or id")
    p.add_argument("--key", default=None, help="limit one key instead of the whole tenant")
    p.add_argument("--spend-cap", default=None, help="per calendar month, e.g. 25.00, or none")
    p.add_argument("--tpm", default=None, help="tokens per minute, or none")

    keys = subparsers.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    p = _leaf(keys, "create", cmd_keys_create, "create a key (printed once)")
    p.add_argument("tenant", help="name or id")
    p.add_argument("--name", default="default")
    p.add_argument("--expires-days", type=int, default=None)
    p = _leaf(keys, "list", cmd_keys_list, "a tenant's keys (prefixes only)")
    p.add_argument("tenant", help="name or id")
    p = _leaf(keys, "revoke", cmd_keys_revoke, "revoke a key", json_flag=False)
    p.add_argument("key", help="key id or ek_<prefix>")

    prices = subparsers.add_parser("prices", help="the price book").add_subparsers(
        dest="prices_command", required=True
    )
    p = _leaf(prices, "set", cmd_prices_set, "add a price (per million tokens)", json_flag=False)
    p.add_argument("model")
    p.add_argument("--adapter", default=None)
    p.add_argument("--input", required=True, help="e.g. 0.15 per million prompt tokens")
    p.add_argument("--cached-input", default=None, help="default: the input price")
    p.add_argument("--output", required=True, help="per million completion tokens")
    _leaf(prices, "list", cmd_prices_list, "every price, oldest first")

    p = _leaf(subparsers, "usage", cmd_usage, "a tenant's tokens and cost in a period")
    p.add_argument("tenant", help="name or id")
    p.add_argument("--period", default=None, help="YYYY-MM (default: this month, UTC)")
    p.add_argument("--group-by", default="model", help="comma list of model,adapter,key,day")
    p = _leaf(subparsers, "invoice", cmd_invoice, "a tenant's invoice for a period")
    p.add_argument("tenant", help="name or id")
    p.add_argument("--period", default=None, help="YYYY-MM (default: this month, UTC)")
