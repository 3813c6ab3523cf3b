"""Replays a bursty arrival trace through a real ``ember serve`` under three pool policies.

    python bench/trace.py --json bench/out/trace.json            # SmolLM2, ~20 min
    python bench/trace.py --json /tmp/t.json --quick --model DIR  # two 12 s days, ~1.5 min

The trace is generated from a seed (``ember_warmpool.traces.daily_arrivals``): a daily
curve compressed into ``--day-s`` seconds, with random bursts and idle gaps. The same
trace is replayed, in real time, against three gateways in turn, each a fresh
``ember serve`` process whose worker pool follows one policy:

- **zero**: scale to zero; a worker stops after ``keepalive_s`` idle, and the next request
  waits for a cold start (forked from the zygote, weights from the host tier);
- **fixed**: ``min_warm = max_workers = N``, sized for the peak with its bursts: no cold
  start ever, at the price of N workers all day;
- **predictive**: scale to zero plus a Holt-Winters forecast of the arrival rate with a
  daily season, ``lead_s`` ahead: Little's law on the forecast, plus one standard
  deviation of Poisson demand (square-root staffing), sets the warm target.

The first day trains the forecaster (every policy sees it, so each starts day two warm
the way it would be); everything is measured from day two on. Time to first token is
measured by the client from the request's *scheduled* arrival, so a late send counts.
Worker-seconds, starts and cold requests (placed on a worker that became READY after the
request arrived) are the gateway's own counters (``/metrics``, ``ember_pool_*``), read at
the start and the end of the measured window.

Request service time and the cold start are measured first (``service_s`` feeds the
pools' Little's-law sizing), and printed. The trace's rates are set from that service
time: ``--peak-load`` is the load at midday in busy workers (rate x service time), so
the pool at the peak of a burst needs about ``peak_load * burst_factor`` workers on any
machine and engine. A fixed rate would not keep the comparison about pool policy: when
the engine got 3x faster, the same 1.5 requests/s sized the fixed pool down to two
workers, and the policies differed by fractions of one worker. ``--peak`` replays a fixed
rate instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trace_gateway import Gateway
from gateway import stream_ttft

POLICIES = ("zero", "fixed", "predictive")
TARGETS = {  # key: (bound, "<=")
    "p99_ratio_predictive_vs_fixed": 1.5,
    "worker_s_ratio_predictive_vs_fixed": 0.6,
    "cold_share_ratio_predictive_vs_zero": 0.33,
}


@dataclass(frozen=True, kw_only=True)
class Scenario:
    day_s: float
    days: int
    peak_rate_per_s: float
    trough_rate_per_s: float
    burst_factor: float
    seed: int
    max_tokens: int
    max_workers: int
    target_concurrency: int
    threads: int
    headroom_sd: float = 0.5  # the predictive pool's, above its forecast

    def trace(self) -> list[float]:
        from ember_warmpool.traces import daily_arrivals

        return daily_arrivals(
            peak_rate_per_s=self.peak_rate_per_s,
            trough_rate_per_s=self.trough_rate_per_s,
            day_s=self.day_s,
            days=self.days,
            seed=self.seed,
            burst_every_s=self.day_s / 2,
            burst_s=self.day_s / 24,
            burst_factor=self.burst_factor,
            gap_every_s=self.day_s / 2,
            gap_s=self.day_s / 12,
        )

    def pools(self, service_s: float, cold_s: float) -> dict[str, dict[str, Any]]:
        """The ``[serve]`` pool settings of each policy."""
        peak_workers = self.peak_rate_per_s * self.burst_factor * service_s
        fixed_n = max(1, min(self.max_workers, math.ceil(peak_workers / self.target_concurrency)))
        common = {
            "pool_max_workers": self.max_workers,
            "pool_target_concurrency": self.target_concurrency,
            "pool_service_s": round(service_s, 3),
            # A few cold starts: long enough not to churn, short next to a (compressed)
            # day, as a minute is next to a real one.
            "pool_keepalive_s": round(max(2.0, 3 * cold_s), 3),
        }
        bucket_s = self.day_s / 24
        return {
            "zero": {**common, "pool_min_warm": 0, "pool_buffer": 0},
            "fixed": {
                **common,
                "pool_min_warm": fixed_n,
                "pool_max_workers": fixed_n,
                "pool_buffer": 0,
            },
            "predictive": {
                **common,
                "pool_min_warm": 0,
                "pool_buffer": 0,  # the forecast is the headroom
                "pool_predictive": True,
                # Square-root staffing above the forecast. Half a standard deviation: a
                # request that finds every worker busy is batched onto one rather than
                # waiting for a start, so more headroom bought no p99 here, only idle
                # workers (bench/README.md: 1.0 against 0.5 on one machine).
                "pool_headroom_sd": self.headroom_sd,
                "pool_lead_s": round(max(2 * cold_s, bucket_s), 3),
                "pool_season_s": self.day_s,
                "pool_forecast_bucket_s": round(bucket_s, 3),
                # Every run learns from the trace's first day, not from an earlier run
                # whose compressed days were out of phase with this one's.
                "pool_keep_forecast": False,
            },
        }


async def _request(gw: Gateway, i: int, max_tokens: int, at: float) -> tuple[float, float, bool]:
    """(TTFT from ``at``, total seconds from ``at``, ok)."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    try:
        ttft = await stream_ttft(gw.port, gw.key, gw.body(i, max_tokens), since=at)
    except (RuntimeError, OSError):
        return math.nan, time.perf_counter() - at, False
    return ttft, time.perf_counter() - at, True


async def replay(gw: Gateway, trace: list[float], sc: Scenario) -> dict[str, Any]:
    """Sends every request at its time; reads the pool's counters as the measured window
    (day two on) opens and as the trace ends."""
    measure_from_s, end_s = sc.day_s, sc.day_s * sc.days
    t0 = time.perf_counter() + 0.5
    tasks = [
        asyncio.create_task(_request(gw, i, sc.max_tokens, t0 + t)) for i, t in enumerate(trace)
    ]
    await asyncio.sleep(max(0.0, t0 + measure_from_s - time.perf_counter()))
    before = await asyncio.to_thread(gw.counters)
    await asyncio.sleep(max(0.0, t0 + end_s - time.perf_counter()))
    after = await asyncio.to_thread(gw.counters)
    results = await asyncio.gather(*tasks)
    measured = [r for r, t in zip(results, trace, strict=True) if t >= measure_from_s]
    ttfts = [r[0] for r in measured if r[2]]
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    placed = d.get("requests_warm", 0.0) + d.get("requests_cold", 0.0)
    return {
        "requests": len(measured),
        "failed": sum(1 for r in measured if not r[2]),
        "p50_ttft_s": _pct(ttfts, 0.5),
        "p99_ttft_s": _pct(ttfts, 0.99),
        "max_ttft_s": max(ttfts, default=math.nan),
        "cold_share": d.get("requests_cold", 0.0) / placed if placed else 0.0,
        "worker_s": d.get("worker_seconds", 0.0),
        "starts": d.get("worker_starts", 0.0),
        # Every measured request: [scheduled arrival s, TTFT s or null], to see where in
        # the day (a burst, a gap's end) the slow ones fall.
        "ttft_by_arrival": [
            [round(t, 3), round(r[0], 4) if r[2] else None]
            for r, t in zip(results, trace, strict=True)
            if t >= measure_from_s
        ],
    }


def _pct(xs: list[float], q: float) -> float:
    from ember_warmpool.simulate import percentile

    return percentile(xs, q) if xs else math.nan


def calibrate(gw: Gateway, max_tokens: int) -> tuple[float, float]:
    """(a request's seconds on a warm worker, median of 3; a worker's cold start, READY
    seconds from ``/workers``: the quickest of the two, the first having filled the host
    tier the later ones read)."""

    async def one(i: int) -> float:
        t0 = time.perf_counter()
        await _request(gw, i, max_tokens, t0)
        return time.perf_counter() - t0

    asyncio.run(one(0))  # first-call allocations
    service_s = statistics.median(asyncio.run(one(i)) for i in range(1, 4))
    ready = [w["cold_start"].get("ready_s") for w in gw.get("/workers")["data"]]
    return service_s, min((float(r) for r in ready if r), default=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m", help="installed name, alias or directory")
    ap.add_argument("--day-s", type=float, default=120.0, help="one compressed day, seconds")
    ap.add_argument("--days", type=int, default=3, help="the first trains; the rest count")
    ap.add_argument(
        "--peak-load",
        type=float,
        default=1.2,
        help="busy workers at midday before bursts (rate x calibrated service time)",
    )
    ap.add_argument("--peak", type=float, default=None, help="requests/s at midday (fixed)")
    ap.add_argument("--trough-fraction", type=float, default=1 / 30, help="midnight / midday")
    ap.add_argument("--burst-factor", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--target-concurrency", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="per worker")
    ap.add_argument(
        "--headroom-sd",
        type=float,
        default=0.5,
        help="the predictive pool's workers above its forecast, in standard deviations",
    )
    ap.add_argument("--host-cache-mib", type=int, default=1024, help="workers' shared RAM tier")
    ap.add_argument("--quick", action="store_true", help="two 12 s days: a smoke run")
    args = ap.parse_args()
    from ember_warmpool.host_sharing import release_host_tier
    from ember_weights_store import default_home

    home = default_home()
    try:
        run(args, home)
    finally:
        # The gateways ran on a budget set for them, which keeps the tier (RAM in
        # /dev/shm) across their restarts, and so after the last one too: give it back.
        freed = release_host_tier(home)
        print(f"gave back {freed / 2**20:.0f} MiB of {home}'s host tier")


def run(args: argparse.Namespace, home: Path) -> None:
    common = {"threads": args.threads, "host_cache_mib": args.host_cache_mib}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        two = {"pool_min_warm": 2, "pool_max_workers": 2}
        # Twice: the first probe fills the host tier and the page cache (its second worker
        # may fork while the first still promotes chunks, and read from disk: 0.7 s
        # against 0.13 s measured once), the second measures what the policies will see.
        cold_starts: list[float] = []
        for probe_name in ("warm-up", "calibrate"):
            probe = Gateway(args.model, home, tmp, probe_name, {**common, **two})
            try:
                probe.wait_ready_workers(2)
                service_s, probe_cold_s = calibrate(probe, args.max_tokens)
                cold_starts.append(probe_cold_s)
            finally:
                probe.stop()
        cold_s = min(cold_starts)
        print(f"service_s {service_s:.3f} (a request on a warm worker), cold start {cold_s:.3f} s")
        peak = args.peak if args.peak is not None else args.peak_load / service_s
        sc = Scenario(
            day_s=12.0 if args.quick else args.day_s,
            days=2 if args.quick else args.days,
            peak_rate_per_s=round(peak, 3),
            trough_rate_per_s=round(peak * args.trough_fraction, 4),
            burst_factor=args.burst_factor,
            seed=args.seed,
            max_tokens=args.max_tokens,
            max_workers=args.max_workers,
            target_concurrency=args.target_concurrency,
            threads=args.threads,
            headroom_sd=args.headroom_sd,
        )
        trace = sc.trace()
        measured_n = sum(1 for t in trace if t >= sc.day_s)
        print(
            f"trace: {len(trace)} requests over {sc.days} x {sc.day_s:.0f} s, {measured_n} "
            f"measured; {sc.peak_rate_per_s:.2f} requests/s at midday, x{sc.burst_factor:g} "
            "in bursts"
        )
        pools = sc.pools(service_s, cold_s)
        for name in POLICIES:
            gw = Gateway(args.model, home, tmp, name, {**common, **pools[name]})
            try:
                gw.wait_ready_workers(pools[name]["pool_min_warm"])
                results[name] = asyncio.run(replay(gw, trace, sc))
            finally:
                gw.stop()
            r = results[name]
            print(
                f"{name:>10}: p50 {r['p50_ttft_s']:.3f} s  p99 {r['p99_ttft_s']:.3f} s  "
                f"cold {r['cold_share']:.3f}  worker-s {r['worker_s']:.1f}  starts "
                f"{r['starts']:.0f}  failed {r['failed']}",
                flush=True,
            )
    out = report(results, sc, service_s, cold_s, pools)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


def report(
    results: dict[str, dict[str, Any]],
    sc: Scenario,
    service_s: float,
    cold_s: float,
    pools: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    from ember_warmpool.simulate import policy_ratios

    out: dict[str, Any] = {
        "scenario": sc.__dict__,
        "service_s": service_s,
        "cold_start_s": cold_s,
        "pools": pools,
        "requests": results["fixed"]["requests"],
    }
    for name, r in results.items():
        for key, value in r.items():
            out[f"{key}_{name}"] = value
    out.update(policy_ratios(out))
    print(
        f"\n{'policy':>10} {'p50 TTFT s':>11} {'p99 TTFT s':>11} {'cold share':>11} {'worker-s':>9}"
    )
    for name in POLICIES:
        r = results[name]
        print(
            f"{name:>10} {r['p50_ttft_s']:>11.3f} {r['p99_ttft_s']:>11.3f} "
            f"{r['cold_share']:>11.3f} {r['worker_s']:>9.1f}"
        )
    print()
    for key, bound in TARGETS.items():
        ok = "ok" if out[key] <= bound else "MISSED"
        print(f"{key} {out[key]:.3f} (target <= {bound}: {ok})")
    return out


if __name__ == "__main__":
    main()
