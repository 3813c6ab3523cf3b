"""Ledger throughput: idempotent usage events per second, batched against naive.

    python bench/billing.py --json /tmp/billing_bench.json [--events 20000] [--naive 600]

For each backend (a fresh SQLite file in WAL mode; a fresh schema on the PostgreSQL
at ``$EMBER_BENCH_POSTGRES_URL``, default 127.0.0.1:5432/test) and in the same run:

* **batched**: every event gets a reservation (``reserve_many``, 1,000 per
  transaction) and is settled (``settle_many``, 1,000 deliveries per transaction)
  with 30% of the deliveries duplicated and the order shuffled, so a third of the
  work is the idempotency path. ``events_per_s`` = unique events / (reserve + settle
  wall time).
* **naive**: the same service, one transaction per ``reserve`` and one per
  ``settle``, same duplicate rate.

Both run with durable commits (SQLite ``synchronous=FULL``, PostgreSQL's default
``synchronous_commit=on``): a throughput number that could lose a commit on power
loss would not be a ledger's number. The ledger is checked after each run (every
entry balances, no event lost or doubled, the tenant owes the sum of its events).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ember_billing import BillingService, Prices, ReserveRequest, Usage

PG_URL = os.environ.get("EMBER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
DUP_FRACTION = 0.30
BATCH = 1000
PRICES = Prices(input_micros=150_000, cached_input_micros=37_500, output_micros=600_000)


@contextmanager
def ledger_url(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{Path(d) / 'ledger.db'}"
        return
    import psycopg

    schema = f"ember_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            base = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
            yield f"{base}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def setup(url: str) -> tuple[BillingService, str, str]:
    svc = BillingService(url)
    t = svc.create_tenant("bench")
    _, key = svc.create_key("bench")
    svc.set_price(
        "m",
        input_micros=PRICES.input_micros,
        cached_input_micros=PRICES.cached_input_micros,
        output_micros=PRICES.output_micros,
    )
    svc.set_quota(t.id, spend_cap_micros=10**15)  # a cap that is checked, never binding
    return svc, t.id, key.id


def workload(n: int, rng: random.Random) -> list[tuple[int, int, int, int, int]]:
    """``(index, prompt, max_completion, completion, cached)`` per event."""
    out = []
    for i in range(n):
        p, m = rng.randint(1, 4000), rng.randint(1, 1000)
        k = rng.randint(0, p)
        out.append((i, p, m, rng.randint(0, m), k))
    return out


def usage_of(event: tuple[int, int, int, int, int]) -> Usage:
    _, prompt, _, completion, cached = event
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)


def deliveries(n: int, rng: random.Random) -> list[int]:
    order = list(range(n)) + rng.sample(range(n), int(n * DUP_FRACTION))
    rng.shuffle(order)
    return order


def verify(svc: BillingService, tenant: str, expected: int, n: int) -> None:
    problems = svc.check_ledger()
    usage = svc.usage(tenant, group_by=())
    got_n = sum(u.requests for u in usage)
    owed = svc.ledger_totals().get(f"tenant:{tenant}:receivable", 0)
    if problems or got_n != n or owed != expected:
        sys.exit(f"LEDGER WRONG: {problems[:3]} events {got_n}/{n} owed {owed}/{expected}")


def run_batched(url: str, n: int) -> dict[str, float]:
    rng = random.Random(1)
    svc, tenant, key = setup(url)
    events = workload(n, rng)
    expected = sum(PRICES.cost(prompt_tokens=p, cached_tokens=k, completion_tokens=c)
                   for _, p, _, c, k in events)  # fmt: skip
    t0 = time.perf_counter()
    ids: list[str] = []
    for lo in range(0, n, BATCH):
        batch = [
            ReserveRequest(tenant, key, "m", "", p, m) for _, p, m, _, _ in events[lo : lo + BATCH]
        ]
        ids += [r.id for r in svc.reserve_many(batch)]
    t1 = time.perf_counter()
    order = deliveries(n, rng)
    for lo in range(0, len(order), BATCH):
        svc.settle_many([(ids[i], usage_of(events[i])) for i in order[lo : lo + BATCH]])
    t2 = time.perf_counter()
    verify(svc, tenant, expected, n)
    svc.close()
    return {
        "events": n,
        "deliveries": len(order),
        "reserve_s": t1 - t0,
        "settle_s": t2 - t1,
        "events_per_s": n / (t2 - t0),
        "settle_deliveries_per_s": len(order) / (t2 - t1),
    }


def run_naive(url: str, n: int) -> dict[str, float]:
    rng = random.Random(2)
    svc, tenant, key = setup(url)
    events = workload(n, rng)
    expected = sum(PRICES.cost(prompt_tokens=p, cached_tokens=k, completion_tokens=c)
                   for _, p, _, c, k in events)  # fmt: skip
    t0 = time.perf_counter()
    ids = [svc.reserve(tenant, key, "m", "", p, m).id for _, p, m, _, _ in events]
    order = deliveries(n, rng)
    for i in order:
        svc.settle(ids[i], usage_of(events[i]))
    t1 = time.perf_counter()
    verify(svc, tenant, expected, n)
    svc.close()
    return {"events": n, "deliveries": len(order), "events_per_s": n / (t1 - t0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--events", type=int, default=20_000, help="events per batched run")
    ap.add_argument("--naive", type=int, default=600, help="events per naive run")
    args = ap.parse_args(argv)
    results: dict[str, object] = {"load_average_at_start": os.getloadavg()[0]}
    rows = []
    runners: list[tuple[str, Callable[[str, int], dict[str, float]], int]] = [
        ("batched", run_batched, args.events),
        ("naive", run_naive, args.naive),
    ]
    for backend in ("sqlite", "postgres"):
        for mode, fn, n in runners:
            with ledger_url("sqlite" if backend == "sqlite" else "postgresql") as url:
                r = fn(url, n)
            results[f"{mode}_{backend}"] = r
            rows.append((backend, mode, r))
            print(f"  {backend:8} {mode:8} {r['events_per_s']:>10,.0f} events/s ({n:,} events)",
                  file=sys.stderr)  # fmt: skip
    for backend in ("sqlite", "postgres"):
        b = results[f"batched_{backend}"]["events_per_s"]  # type: ignore[index]
        nv = results[f"naive_{backend}"]["events_per_s"]  # type: ignore[index]
        results[f"events_per_s_{backend}"] = b
        results[f"naive_events_per_s_{backend}"] = nv
        results[f"ratio_vs_naive_{backend}"] = b / nv
    results["duplicate_fraction"] = DUP_FRACTION
    results["batch_size"] = BATCH
    results["durable_commits"] = True
    results["load_average_at_end"] = os.getloadavg()[0]
    print("\n| backend | batched events/s | naive events/s | batched / naive |")
    print("|---|---:|---:|---:|")
    for backend in ("sqlite", "postgres"):
        print(
            f"| {backend} | {results[f'events_per_s_{backend}']:,.0f} | "
            f"{results[f'naive_events_per_s_{backend}']:,.0f} | "
            f"{results[f'ratio_vs_naive_{backend}']:.1f}x |"
        )
    print(
        f"\nload average (1 min) {results['load_average_at_start']:.1f} at start, "
        f"{results['load_average_at_end']:.1f} at end"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
