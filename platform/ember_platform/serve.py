"""``ember serve``: the gateway, a warm pool of worker processes running a model, and a
SQLite ledger.

Workers are separate processes (``ember_functions.worker``), forked from a zygote that
imported torch and Ember once, in a ``ModelPool`` behind a ``PoolRouter``: the engine never
competes with the gateway's event loop for one interpreter's lock, a worker that crashes
fails its requests cleanly (or they are retried) and is replaced, and the pool scales
between ``pool_min_warm`` and ``pool_max_workers`` (by default exactly one worker).

Settings come from, highest first: flags, environment (``EMBER_SERVE_<NAME>``), a TOML
config file (``--config``, its ``[serve]`` table), and the defaults below. All are validated
before anything starts, and a config file with a key this version does not know is refused.

On first start (an empty ledger) it creates a tenant ``default``, prices the served model,
and prints an API key for it once: the ledger keeps only the key's salted hash.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from ember_core import ConfigError

__all__ = ["ServeSettings", "build_app", "register"]


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2-135m"
    home: str = ""  # empty: $EMBER_HOME, else ~/.cache/ember
    ledger_url: str = ""  # empty: sqlite at <home>/ledger.db
    threads: int = 0  # 0: every core
    max_num_seqs: int = 32
    max_body_bytes: int = 1 << 20
    requests_per_minute_per_key: int = 0  # 0: no limit
    auth_cache_s: float = 5.0
    # First-start price for the served model, micro-units (of USD) per million tokens.
    input_micros_per_m: int = 50_000
    cached_input_micros_per_m: int = 25_000
    output_micros_per_m: int = 100_000
    log_level: str = "info"
    # The warm pool (ember_warmpool.PoolPolicy): by default one worker, always warm.
    pool_min_warm: int = 1
    pool_max_workers: int = 1
    pool_buffer: int = 0
    pool_keepalive_s: float = 300.0
    pool_predictive: bool = False  # start workers ahead of the forecast arrival rate
    # Warmth of workers held beyond those serving: READY, HOST (weights in RAM, not bound;
    # a promotion binds them) or PROCESS (imports done; a promotion loads).
    pool_reserve_warmth: str = "READY"
    pool_target_concurrency: int = 1  # requests a worker takes before the pool grows
    pool_lead_s: float = 10.0  # how far ahead to forecast: about one cold start
    pool_headroom_sd: float = 0.0  # workers above the forecast load, in its std devs
    pool_service_s: float = 2.0  # a request's typical time on a worker (Little's law)
    # The forecaster's season (0: no season, EWMA with trend only) and its rate bucket.
    pool_season_s: float = 86_400.0
    pool_forecast_bucket_s: float = 60.0
    # Keep what the forecaster learned in <home>/pools/<model>.forecast.json, so that a
    # restart resumes with the day's shape; false: every start learns afresh.
    pool_keep_forecast: bool = True
    queue_timeout_s: float = 120.0  # how long a request waits for a worker before a 503
    # On shutdown, workers take nothing new and finish what they run, for up to this long.
    drain_timeout_s: float = 30.0
    zygote: bool = True  # fork workers from a process that imported everything once
    # Host RAM (/dev/shm) the machine's workers share the model's weights in: a worker the
    # pool starts then maps them (and the packed matrices) instead of holding its own.
    # None ("auto"): on, sized for the model, when the pool can run more than one worker,
    # and given back at shutdown (ember_warmpool.host_sharing). 0 turns the tier off; a
    # size keeps it as a cache across restarts.
    host_cache_mib: int | None = None
    # Where workers fetch the weights: "" (the model installed in the home, as `ember
    # models add` leaves it) or s3://bucket/prefix (put there by `ember models push`):
    # nothing is installed here then, and each worker's readahead fetches what the
    # machine's tiers lack while it imports torch. weights_endpoint_url: an
    # S3-compatible endpoint ("": AWS's); credentials come from the environment.
    weights_origin: str = ""
    weights_endpoint_url: str = ""

    def __post_init__(self) -> None:
        ints = {f.name for f in fields(self) if f.type in ("int", int)}
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"serve setting {name} must be an integer >= 0, got {value!r}")
        mib = self.host_cache_mib
        if mib is not None and (isinstance(mib, bool) or not isinstance(mib, int) or mib < 0):
            raise ConfigError(
                f"host_cache_mib must be an integer >= 0 (0 turns the host tier off) or "
                f'"auto", got {mib!r}'
            )
        if self.weights_origin and not self.weights_origin.startswith("s3://"):
            raise ConfigError(
                f"weights_origin must be empty (the model installed in the home) or "
                f"s3://bucket/prefix, got {self.weights_origin!r}"
            )
        if self.weights_endpoint_url and not self.weights_origin:
            raise ConfigError(
                "weights_endpoint_url is set but weights_origin is not; set weights_origin "
                "to the s3://bucket/prefix the model was pushed to"
            )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be 1-65535, got {self.port}")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"log_level {self.log_level!r} is not a uvicorn log level")
        if not self.queue_timeout_s > 0:
            raise ConfigError(f"queue_timeout_s must be > 0, got {self.queue_timeout_s!r}")
        for name in ("pool_service_s", "pool_forecast_bucket_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        self.pool_policy()  # validates the pool settings together
        try:
            self.forecaster()
        except ValueError as exc:
            raise ConfigError(f"pool_season_s / pool_forecast_bucket_s: {exc}") from None

    def pool_policy(self) -> Any:
        """The warm pool's ``PoolPolicy``; ConfigError if the pool settings disagree."""
        from ember_warmpool import PoolPolicy, Warmth

        return PoolPolicy(
            min_warm=self.pool_min_warm,
            max_workers=self.pool_max_workers,
            buffer=self.pool_buffer,
            keepalive_s=self.pool_keepalive_s,
            predictive=self.pool_predictive,
            target_concurrency=self.pool_target_concurrency,
            lead_s=self.pool_lead_s,
            headroom_sd=self.pool_headroom_sd,
            reserve_warmth=Warmth.parse(self.pool_reserve_warmth),
        )

    def forecaster(self) -> Any:
        """The arrival-rate forecaster of a predictive pool (None otherwise): Holt-Winters
        with a ``pool_season_s`` season, or Holt's EWMA with trend when that is 0."""
        from ember_warmpool import HoltForecaster, SeasonalForecaster

        if not self.pool_predictive:
            return None
        bucket_s = self.pool_forecast_bucket_s
        if self.pool_season_s == 0:
            return HoltForecaster(bucket_s=bucket_s)
        buckets = min(48, int(self.pool_season_s // bucket_s))
        return SeasonalForecaster(
            season_s=self.pool_season_s,
            profile_buckets=buckets,
            bucket_s=bucket_s,
        )

    @classmethod
    def load(
        cls, flags: dict[str, Any], *, env: dict[str, str], config: Path | None
    ) -> ServeSettings:
        """Merges defaults < config file < environment < flags (``None`` flags are unset)."""
        known = {f.name: f for f in fields(cls)}
        merged: dict[str, Any] = {}
        if config is not None:
            try:
                table = tomllib.loads(config.read_text()).get("serve", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {config}: {exc}") from None
            unknown = sorted(set(table) - set(known))
            if unknown:
                raise ConfigError(
                    f"{config}: unknown [serve] settings {unknown}; known: {sorted(known)}"
                )
            merged.update(table)
        for name, f in known.items():
            raw = env.get(f"EMBER_SERVE_{name.upper()}")
            if raw is not None:
                merged[name] = _parse(name, raw, f.type)
        merged.update({k: v for k, v in flags.items() if v is not None and k in known})
        mib = merged.get("host_cache_mib")
        if isinstance(mib, str):  # "auto", or a flag's number
            try:
                merged["host_cache_mib"] = None if mib == "auto" else int(mib)
            except ValueError:
                raise ConfigError(
                    f'host_cache_mib must be a number of MiB or "auto", got {mib!r}'
                ) from None
        return cls(**merged)


def _parse(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
        if kind in ("bool", bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
    except ValueError:
        raise ConfigError(f"EMBER_SERVE_{name.upper()}={raw!r} is not a {kind}") from None
    return raw


def build_app(settings: ServeSettings, *, out: TextIO) -> Any:
    """Installs the model if needed, starts its warm pool (the first worker is READY when
    this returns) and the ledger, bootstraps on first start, and returns the ASGI app."""
    from ember_billing.service import BillingService
    from ember_functions.engine_config import EngineConfig
    from ember_functions.launch import Zygote
    from ember_platform.gateway import GatewayConfig, create_app
    from ember_platform.pool_router import PoolRouter
    from ember_warmpool.forecast_file import forecast_path
    from ember_warmpool.manager import ModelPool
    from ember_weights_store import default_home

    home = Path(settings.home) if settings.home else default_home()
    home.mkdir(parents=True, exist_ok=True)
    config = EngineConfig(num_threads=settings.threads or None, max_num_seqs=settings.max_num_seqs)
    policy = settings.pool_policy()
    store = _pool_store(settings, home=home, max_workers=policy.max_workers, out=out)
    ledger = settings.ledger_url or f"sqlite:///{home / 'ledger.db'}"
    billing = BillingService(ledger)
    zygote = Zygote.start(zygote_id=f"serve-{os.getpid()}") if settings.zygote else None
    pool = ModelPool(
        settings.model,
        home=home,
        policy=policy,
        engine_config=config,
        store=store,
        release_host_tier=settings.host_cache_mib is None,
        launcher=zygote,
        forecaster=settings.forecaster(),  # on wall-clock time: its season is the day
        forecast_file=forecast_path(home, settings.model) if settings.pool_keep_forecast else None,
        service_s=settings.pool_service_s,
    )
    try:
        pool.start()
    except BaseException:
        pool.close()
        if zygote is not None:
            zygote.close()
        billing.close()
        raise
    (first,) = pool.status()
    phases = pool.cold_starts[str(first["worker_id"])]
    print(
        f"worker {first['worker_id']} (pid {first['pid']}) ready in {phases['ready_s']:.2f} s"
        f"{' (forked from the zygote)' if zygote else ''}; pool of {settings.pool_min_warm}"
        f"-{settings.pool_max_workers} workers",
        file=out,
    )
    _bootstrap(billing, pool.model_name, settings, out)
    gateway = GatewayConfig(
        max_body_bytes=settings.max_body_bytes,
        requests_per_minute_per_key=settings.requests_per_minute_per_key or None,
        auth_cache_s=settings.auth_cache_s,
    )
    router = PoolRouter({pool.model_name: pool}, queue_timeout_s=settings.queue_timeout_s)
    app = create_app(router, billing, gateway)

    def close() -> None:
        pool.close(drain_timeout_s=settings.drain_timeout_s)
        if zygote is not None:
            zygote.close()
        billing.close()

    app.router.add_event_handler("shutdown", close)
    return app


def _pool_store(settings: ServeSettings, *, home: Path, max_workers: int, out: TextIO) -> Any:
    """The ``StoreConfig`` the pool's workers load through: the model installed in the
    home (installed now if need be) or ``weights_origin``, and the host tier they share it
    in, the operator's budget or an automatic plan (``ember_warmpool.host_sharing``)."""
    from ember_functions.loading import StoreConfig
    from ember_warmpool.host_sharing import pool_store

    origin = None
    if settings.weights_origin:  # nothing is installed: the workers load from the origin
        origin = StoreConfig(
            origin=settings.weights_origin,
            endpoint_url=settings.weights_endpoint_url or None,
        )
    mib = settings.host_cache_mib
    store, sharing = pool_store(
        settings.model,
        home=home,
        max_workers=max_workers,
        origin=origin,
        budget_bytes=None if mib is None else mib << 20,  # a cache kept across restarts
        err=out,
    )
    if sharing is not None:
        print(sharing.reason, file=out)
    return store


def _bootstrap(billing: Any, model: str, s: ServeSettings, out: TextIO) -> None:
    if not any(p["model"] == model for p in billing.list_prices()):
        billing.set_price(
            model,
            input_micros=s.input_micros_per_m,
            cached_input_micros=s.cached_input_micros_per_m,
            output_micros=s.output_micros_per_m,
        )
    if billing.list_tenants():
        return
    billing.create_tenant("default")
    key, _ = billing.create_key("default", name="bootstrap")
    print(
        "first start: created tenant 'default' and its API key (shown once, keep it):\n"
        f"    {key}\n"
        f"    export OPENAI_BASE_URL=http://{s.host}:{s.port}/v1 OPENAI_API_KEY={key}",
        file=out,
        flush=True,
    )


def cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import uvicorn

    flags = {f.name: getattr(args, f.name, None) for f in fields(ServeSettings)}
    settings = ServeSettings.load(
        flags, env=dict(os.environ), config=Path(args.config) if args.config else None
    )
    app = build_app(settings, out=err)
    print(f"serving {settings.model} on http://{settings.host}:{settings.port}/v1", file=err)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible gateway on a local worker")
    p.add_argument("--config", default=None, help="TOML file with a [serve] table")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model", default=None, help="installed name or alias (default smollm2)")
    p.add_argument("--ledger-url", dest="ledger_url", default=None, help="SQLAlchemy URL")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-warm", dest="pool_min_warm", type=int, default=None)
    p.add_argument("--max-workers", dest="pool_max_workers", type=int, default=None)
    p.add_argument(
        "--host-cache-mib",
        dest="host_cache_mib",
        default=None,
        help='host RAM the workers share the model in: "auto" (default), MiB, or 0 (off)',
    )
    p.add_argument(
        "--weights-origin",
        dest="weights_origin",
        default=None,
        help="s3://bucket/prefix the model was pushed to: workers load from there, "
        "nothing is installed here (default: the model installed in the home)",
    )
    p.add_argument(
        "--weights-endpoint-url",
        dest="weights_endpoint_url",
        default=None,
        help="S3-compatible endpoint of --weights-origin (default: AWS)",
    )
    p.add_argument("--log-level", dest="log_level", default=None)
    p.set_defaults(serve_handler=cmd_serve)
