"""Whether a pool's workers share one copy of the model in host RAM, and how much.

The host tier (``ember_weights_store.HostTier``, files in /dev/shm) is where the
workers of one machine share what they derive from a model: the matrices the first
worker packed for oneDNN, which later workers map instead of packing their own
(``packed_cache``), and bound copies in another dtype (``bound_cache``). On SmolLM2 a
worker then holds ~175 MiB of private RAM instead of ~430-600
(``bench/packed_sharing.py``). The decoded weights themselves every worker maps from
the disk tier's files: a page-cache copy shared just as a tmpfs one would be, whose
pages the kernel may reclaim once no worker maps them, while the host tier's stay in RAM
until it is released. Packed workers hand back the matrices they replace
(``Packing.release_unpacked``), so a pool keeps in RAM only what it reads
(``StoreConfig.host_chunks=False``). A budget an operator sets keeps the chunks in the
host tier too: the model stays in host RAM whatever the page cache does.

The tier costs RAM of its own, held while the pool runs, so it pays only where a pool
can run more than one worker. :func:`plan_host_sharing` decides that in plain Python;
:func:`auto_host_sharing` measures its inputs (the checkpoint's bytes, free /dev/shm)
and returns the plan with the ``StoreConfig`` to run the pool on. A tier on an automatic
plan lives as long as its pool: the pool gives its unpinned objects back when it closes
(:func:`release_host_tier`), and what a pool killed before its close left behind is
given back when the next automatic plan is made on that home. A budget an operator set
is a cache kept across restarts instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ember_functions.loading import StoreConfig

if TYPE_CHECKING:
    from ember_weights_store import ModelCatalog
    from ember_weights_store.host_tier import HostTier

# The tier holds at most two copies in the compute dtype: the bound weights (only where
# binding converts) and the packed matrices. A bf16 checkpoint computed in float32 is the
# widest case: 2 + 2 times the checkpoint. The chunks stay in the disk tier.
_CHECKPOINT_MULTIPLE = 4
# Never plan more than this share of /dev/shm's free space: it is the machine's RAM.
_SHM_SHARE = 0.5

_MIB = 1 << 20


@dataclass(frozen=True)
class HostSharingPlan:
    budget_bytes: int  # the host tier's budget; 0: off, each worker reads its own copy
    reason: str  # one line for the operator: what was decided, and why

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0


def plan_host_sharing(
    *,
    max_workers: int,
    checkpoint_bytes: int,
    shm_free_bytes: int,
    served_from_dir: Path | None = None,
    holds_chunks: bool = False,
) -> HostSharingPlan:
    """The host tier a pool of up to ``max_workers`` workers of a ``checkpoint_bytes``
    model gets, with ``shm_free_bytes`` free in /dev/shm. ``served_from_dir`` is the
    directory of a model served from there rather than installed in the home: its
    workers read the directory and never the store, so a tier would hold nothing.
    ``holds_chunks``: the tier holds the decoded chunks too (a model fetched from S3): a
    checkpoint more.

    Example::

        plan_host_sharing(max_workers=4, checkpoint_bytes=270 << 20, shm_free_bytes=12 << 30)
        # HostSharingPlan(budget_bytes=1415577600, reason='workers share ...')
    """
    if max_workers <= 1:
        return HostSharingPlan(
            0, "host tier off: the pool runs one worker at a time, so nothing is shared"
        )
    if served_from_dir is not None:
        return HostSharingPlan(
            0,
            f"host tier off: the model is served from its directory {served_from_dir}, "
            "which each worker reads on its own; to have the workers share one copy in "
            f"host RAM, run `ember models import {served_from_dir} --name NAME` and serve NAME",
        )
    want = (_CHECKPOINT_MULTIPLE + holds_chunks) * checkpoint_bytes
    allowed = int(shm_free_bytes * _SHM_SHARE)
    # One packed copy in the checkpoint's dtype must fit, or sharing saves little.
    least = checkpoint_bytes
    if allowed < least:
        return HostSharingPlan(
            0,
            f"host tier off: sharing the model needs at least {least // _MIB} MiB of "
            f"/dev/shm and half of its free {shm_free_bytes // _MIB} MiB is less; enlarge "
            "/dev/shm (docker run --shm-size) or set host_cache_mib",
        )
    budget = min(want, allowed)
    weights = (
        "the weights fetched from the origin are kept there too"
        if holds_chunks
        else "the weights they map from the disk tier"
    )
    return HostSharingPlan(
        budget,
        f"workers share the model's packed copies in host RAM (/dev/shm): a tier of up "
        f"to {budget // _MIB} MiB, given back when the pool closes; {weights}",
    )


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of a Hugging Face directory's safetensors files: the decoded weights."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def shm_free_bytes(shm: Path = Path("/dev/shm")) -> int:
    """Bytes an unprivileged process may still write to the tmpfs at ``shm``; 0 if there
    is none."""
    try:
        st = os.statvfs(shm)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def auto_host_sharing(
    model_dir: Path, *, max_workers: int, home: Path, shm: Path = Path("/dev/shm")
) -> tuple[StoreConfig, HostSharingPlan]:
    """The store a pool of the model in ``model_dir`` runs on when nobody set a host
    tier budget, and the plan behind it.

    If no live process uses ``home``'s host tier, it first gives back what the tier
    holds (``HostTier.release_abandoned``): a pool on an automatic plan releases its
    tier when it closes, so that is what a pool killed (SIGKILL, OOM) before it could
    left behind, which would otherwise hold RAM until reboot and shrink the free
    /dev/shm this plan measures. A tier another live pool uses is left alone: that pool
    gives it back itself.

    Example::

        store, plan = auto_host_sharing(model_dir, max_workers=4, home=default_home())
        print(plan.reason)
    """
    catalog = _released_abandoned(home)
    plan = plan_host_sharing(
        max_workers=max_workers,
        checkpoint_bytes=checkpoint_bytes(model_dir),
        shm_free_bytes=shm_free_bytes(shm),
        served_from_dir=None if catalog.loads_through_store(model_dir) else Path(model_dir),
    )
    return StoreConfig(host_cache_bytes=plan.budget_bytes, host_chunks=False), plan


def auto_host_sharing_from_origin(
    origin: StoreConfig,
    *,
    weights_bytes: int,
    max_workers: int,
    home: Path,
    shm: Path = Path("/dev/shm"),
) -> tuple[StoreConfig, HostSharingPlan]:
    """:func:`auto_host_sharing` for a pool whose model is in ``origin`` (a store with an
    S3 origin), not installed in ``home``, its decoded size ``weights_bytes`` (from its
    manifest). The tier holds the fetched chunks too: the machine's one decoded copy of
    them, which a new worker's readahead fills while it imports and later workers map.

    Example::

        origin = StoreConfig(origin="s3://models/team")
        store, plan = auto_host_sharing_from_origin(
            origin, weights_bytes=270 << 20, max_workers=4, home=default_home()
        )
    """
    _released_abandoned(home)
    plan = plan_host_sharing(
        max_workers=max_workers,
        checkpoint_bytes=weights_bytes,
        shm_free_bytes=shm_free_bytes(shm),
        holds_chunks=True,
    )
    return dataclasses.replace(origin, host_cache_bytes=plan.budget_bytes), plan


def pool_store(
    model: str,
    *,
    home: Path,
    max_workers: int,
    origin: StoreConfig | None = None,
    budget_bytes: int | None = None,
    err: TextIO,
) -> tuple[StoreConfig, HostSharingPlan | None]:
    """The store a pool of ``model`` runs on, for ``ember serve`` and the SDK's pools
    alike: from ``origin`` (checked to hold the model: nothing is installed) or installed
    in ``home`` (now, if it is a known model not installed yet), through a host tier of
    the operator's ``budget_bytes`` (no plan then: a cache kept across restarts) or an
    automatic plan (:func:`auto_host_sharing`, :func:`auto_host_sharing_from_origin`).

    Example::

        store, plan = pool_store("smollm2-135m", home=home, max_workers=4, err=sys.stderr)
    """
    from ember_functions.loading import resolve_model_dir
    from ember_weights_store import ModelCatalog

    if origin is not None:
        weights_bytes = origin.origin_raw_size_bytes(model)  # not there: which push to run
        if budget_bytes is not None:
            return dataclasses.replace(origin, host_cache_bytes=budget_bytes), None
        return auto_host_sharing_from_origin(
            origin, weights_bytes=weights_bytes, max_workers=max_workers, home=home
        )
    model_dir = resolve_model_dir(ModelCatalog(home), model, err=err)  # installs
    if budget_bytes is not None:
        return StoreConfig(host_cache_bytes=budget_bytes), None
    return auto_host_sharing(model_dir, max_workers=max_workers, home=home)


def _released_abandoned(home: Path) -> ModelCatalog:
    """``home``'s catalog, after giving back what its host tier holds if no live process
    uses it (``HostTier.release_abandoned``; see :func:`auto_host_sharing`)."""
    from ember_weights_store import ModelCatalog

    catalog = ModelCatalog(home)
    tier = _tier_of(catalog)
    if tier is not None:
        tier.release_abandoned()
    return catalog


def release_host_tier(home: Path) -> int:
    """Gives back what ``home``'s host tier holds that no live process pins
    (``HostTier.release_unpinned``): the bytes freed, 0 where there is no tier. A pool on
    an automatic plan calls it once its workers are gone."""
    from ember_weights_store import ModelCatalog

    tier = _tier_of(ModelCatalog(home))
    return tier.release_unpinned() if tier is not None else 0


def _tier_of(catalog: ModelCatalog) -> HostTier | None:
    """The catalog's home's host tier, opened to give objects back; None where no pool on
    that home ever filled one."""
    from ember_weights_store.host_tier import HostTier

    root = catalog.host_cache_root
    # Giving back never reads the budget; a tier is only opened with one.
    return HostTier(root, budget_bytes=1) if root.is_dir() else None
