"""``ember pool status``: the workers of a running ``ember serve``, their states, and where
the time of each one's cold start went."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any, TextIO

from ember_core import ConfigError

__all__ = ["register"]

# The phases shown, in the order a cold start goes through them.
PHASES = (
    "spawn_s",
    "imports_s",
    "manifest_s",
    "fetch_s",
    "decompress_s",
    "fill_s",  # a sharing pool's first worker: the shared tier filled from further out
    "load_s",
    "host_s",  # to HOST warmth: the weights in RAM
    "bind_s",  # building the model on them: part of load_s, or a promotion from HOST
    "ready_s",
    "first_token_s",  # its first request's: from submission (or READY) to the first token
)


def fetch_workers(url: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/workers", timeout=10) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(
            f"cannot reach ember serve at {url}: {exc}; start it, or pass --url"
        ) from None
    rows: list[dict[str, Any]] = body["data"]
    return rows


def _packed(row: dict[str, Any]) -> str:
    """Seconds spent packing, once done; "partial" when host RAM stopped it part-way;
    "shared" when the worker maps the packed matrices another worker left in the host
    tier."""
    if row.get("pack_s") is None:
        return "-"
    if row.get("pack_shared"):
        return "shared"
    return f"{row['pack_s']:.3f}" + (" partial" if row.get("pack_stopped") else "")


def _mib(size: int | None) -> str:
    """RAM only this worker holds, what stopping it frees (``private_bytes``)."""
    return "-" if size is None else f"{size / 2**20:.0f}"


def render(rows: list[dict[str, Any]]) -> str:
    head = [
        *("model", "worker", "pid", "state", "warmth", "in flight", "idle s", "packed"),
        *("private MiB", "weights from", *PHASES),
    ]
    table = [head]
    for r in rows:
        cold = r.get("cold_start") or {}
        table.append(
            [
                str(r["model"]),
                str(r["worker_id"]),
                str(r["pid"] or "-"),
                str(r["state"]),
                str(r.get("warmth", "-")),
                str(r["in_flight"]),
                "-" if r.get("idle_s") is None else f"{r['idle_s']:.1f}",
                _packed(r),
                _mib(r.get("private_bytes")),
                "+".join(sorted(r.get("chunks_by_tier") or {})) or "-",
                *(f"{cold[p]:.3f}" if p in cold else "-" for p in PHASES),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    if not rows:
        lines.append("(no workers: the pool scaled to zero)")
    return "\n".join(line.rstrip() for line in lines)


def cmd_pool_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rows = fetch_workers(args.url)
    print(json.dumps(rows, indent=1) if args.json else render(rows), file=out)
    return 0


def register(sub: Any) -> None:
    pool = sub.add_parser("pool", help="the warm pool of a running ember serve")
    verbs = pool.add_subparsers(dest="pool_command", required=True)
    status = verbs.add_parser("status", help="workers, their states and last cold starts")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="ember serve's address")
    status.add_argument("--json", action="store_true", help="rows as JSON")
    status.set_defaults(pool_handler=cmd_pool_status)
