"""An engine's packed matrices over its life: packed here, or shared through the host tier.

oneDNN runs a matmul faster on a matrix packed into its blocked layout (``Linear.pack``),
but the packed copy is as big as the matrix. A worker packs once idle, a layer at a time
(``pack``), gives layers back when host RAM runs short (``unpack``), and shares: where an
earlier worker of the model left its packed matrices in the machine's host tier
(``packed_cache``), it maps those at bind instead of packing (``share``); where none did,
it stores its own once all are packed and, once they are stored, runs on the stored copy
too and frees its own (``share_stored``), as does any worker that packed its own
meanwhile, so the machine holds one copy however many workers serve the model.

Workers started together would all pack, each paying the CPU and a private copy, to keep
only the first copy stored. One packs for all instead: packing takes the host tier's
lease for the model's packed matrices (``PackedCache.lease``) and renews it with each
layer, and holds it until its copy is stored; the others wait (``waits_for_another``) and map
that copy once it lands. A packer that stops renewing (busy serving while another worker
idles, out of RAM, gone) loses the lease to the next that packs; it packs no further, and
switches to the stored copy like the rest. How long "stops" is: ``PACK_LEASE_STALE_S``, or
``PACK_LEASE_PACES`` times the next layer's expected packing time where that is longer
(a big model's layers on a slow machine), so a packer is never overtaken mid-layer.

This class keeps the accounts and makes those calls at the right moments; the tensors
are the model's (``LlamaModel.pack_weights`` and friends).
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from ember_functions.host_memory import release_free_heap
from ember_functions.model import LlamaModel
from ember_functions.packed_cache import PackedCache
from ember_weights_store.host_lease import HostLease
from ember_weights_store.mapping import drop_file_pages

__all__ = ["PACK_LEASE_PACES", "PACK_LEASE_STALE_S", "Packing"]

# A worker packs a layer each idle turn (0.02-0.3 s for models up to ~1B on 2 cores), so a
# packer that has renewed nothing for this long is serving, or has stopped: a waiting
# worker packs instead.
PACK_LEASE_STALE_S = 3.0
# ...unless its next layer is expected to take longer than a few seconds: the lease then
# waits this many times that expectation (measured on the layers it packed, per byte).
PACK_LEASE_PACES = 4.0


class Packing:
    """One engine's packing. ``enabled`` is ``EngineConfig.pack_weights``: off, nothing
    is ever packed, stored or mapped.

    Example::

        packing = Packing(model, enabled=True)
        packing.share(host.packed_cache(model.dtype, pack_rows=512))  # at bind
        while not packing.pack(max_layers=1):  # once idle
            ...
        packing.share_stored()  # later, once idle: True when it switched to the shared copy
    """

    def __init__(self, model: LlamaModel, *, enabled: bool) -> None:
        self.model = model
        self.enabled = enabled
        self._cache: PackedCache | None = None  # where the machine keeps them, if anywhere
        self._stored: Future[bool] | None = None  # this engine's own copy, on its way there
        self._tried_store = False
        self._load_failed = False  # set by _adopt: the stored copy would not load here
        self._lease: HostLease | None = None  # packing for the machine, with the cache
        self.packed_layers = 0  # packed here, ever (the LM head counts as one)
        # The matrices (``LlamaModel.unpacked_matrices`` names) that are views of chunk
        # files mapped in place, whose pages the engine can hand back once packed copies
        # stand in for them (``release_unpacked``).
        self._mapped: frozenset[str] = frozenset()
        self.released_bytes = 0  # unpacked matrices' pages handed back, last time
        self._s_per_byte: float | None = None  # packing's pace here, from the last layer

    def pack(self, *, max_layers: int | None = None) -> bool:
        """Packs up to ``max_layers`` more layers (all by default); True once nothing is
        left to pack, or when packing is off or does not apply. Having packed the last
        one, it starts storing them in the host tier, if the machine has none there yet.
        If another worker's copy lands there meanwhile, it maps that instead of packing
        the rest (``share_stored``); while another worker packs for the machine, it
        packs nothing and returns False (``waits_for_another``)."""
        if not self.enabled or self.share_stored():
            return True
        lease = self._lease if not self._load_failed else None
        next_bytes = self.model.next_pack_bytes()
        if lease is not None and next_bytes and not lease.acquire(stale_s=self.lease_stale_s()):
            return False
        units = self.model.packed_units
        t0 = time.perf_counter()
        done = self.model.pack_weights(max_layers=max_layers)
        self.packed_layers += self.model.packed_units - units
        if self.model.packed_units == units + 1 and next_bytes:
            self._s_per_byte = (time.perf_counter() - t0) / next_bytes
        if lease is not None and not done:
            # Renewed now too, so the wait others owe covers the next layer from its start
            # (the renewal before began with the layer just packed); lost meanwhile, the
            # lease stays lost.
            lease.renew(stale_s=self.lease_stale_s())
        if done:
            self.release_unpacked()
        if done and lease is not None:
            self._store(lease)
        return done

    def lease_stale_s(self) -> float:
        """How long others wait, after this engine renews the packing lease, before they
        may take it: ``PACK_LEASE_STALE_S``, or longer where the next layer is expected to
        take longer than a fraction of that (``PACK_LEASE_PACES``)."""
        if self._s_per_byte is None:
            return PACK_LEASE_STALE_S
        expected_s = self._s_per_byte * self.model.next_pack_bytes()
        return max(PACK_LEASE_STALE_S, PACK_LEASE_PACES * expected_s)

    def maps_weights(self, storages: frozenset[int]) -> None:
        """Notes which of the model's matrices view chunk files mapped in place: those
        whose storage is one of ``storages`` (``HostModel.mapped_storages``, asked at
        bind, while the mapping is certainly alive, so an address cannot have been reused).
        Only their pages are handed back by ``release_unpacked``: anything else is this
        process's own memory, where handing pages back would zero it."""
        self._mapped = frozenset(
            name
            for name, w in self.model.unpacked_matrices().items()
            if w.untyped_storage().data_ptr() in storages
        )

    def release_unpacked(self) -> int:
        """Hands back this process's mapping of the unpacked matrices the packed copies
        stand in for (``LlamaModel.idle_unpacked_matrices``), where they are mapped from
        chunk files; returns the bytes. No step reads them while packed; ``unpack``, a
        re-bind or the check of a stored copy that reads one faults its bytes back in from
        the file. From the disk tier, the pages stay in the page cache, reclaimable; from
        the host tier, in tmpfs: held by the tier either way, no longer by the worker."""
        released = 0
        for name, w in self.model.idle_unpacked_matrices().items():
            if name in self._mapped:
                released += drop_file_pages(w.data_ptr(), w.numel() * w.element_size())
        self.released_bytes = released
        return released

    def _store(self, lease: HostLease) -> None:
        """All packed: leaves them in the host tier, holding the lease until they are
        there (storing renews nothing), unless the machine has a copy already."""
        if self._tried_store:  # once: a full tier stays full a while
            if self._stored is None:  # not on its way: nothing to hold the lease for
                lease.release()
            return
        self._tried_store = True
        cache, matrices = self._cache, self.model.packed_matrices()
        if (
            cache is None
            or self.model.packing_shared
            or not matrices
            or cache.available()
            or not lease.acquire(until_released=True)
        ):
            lease.release()
            return
        self._stored = cache.store_in_background(matrices)
        self._stored.add_done_callback(lambda _: lease.release())

    def waits_for_another(self) -> bool:
        """Whether another engine on this machine (a worker started with this one) packs
        the model's matrices for all now: ``pack`` packs nothing meanwhile, and this
        engine maps their copy once it is stored. False once it is, or once that engine
        has renewed nothing for as long as it said (``lease_stale_s``): this one packs
        then."""
        cache, lease = self._cache, self._lease
        if lease is None or cache is None or self.model.packing_shared or self._load_failed:
            return False
        return not cache.available() and lease.held_elsewhere()

    def share(self, cache: PackedCache | None) -> bool:
        """Where this machine keeps the model's packed matrices: if an earlier worker left
        them there, the model runs on them from now on, mapped, not packed (True);
        otherwise this engine leaves its own there once it has packed them all. Call it
        before the engine serves: adopting them swaps the matrices a step reads."""
        if not self.enabled:
            return False
        self._cache = cache
        if cache is not None:
            holder = f"engine-{id(self):x}"  # engines of one process hold their own
            self._lease = cache.lease(holder=holder, stale_s=PACK_LEASE_STALE_S)
        if cache is None or self.model.packed_units or not cache.available():
            return False
        return self._adopt(cache)

    def share_stored(self) -> bool:
        """Once the machine keeps the model's packed matrices (this engine's own, stored
        by ``pack``, or another worker's), runs on the stored copy and drops any of its
        own: True when it switched. Cheap until then (a file's existence). Call it between
        steps, as ``share``."""
        cache = self._cache
        if cache is None or self.model.packing_shared or self._load_failed:
            return False
        if self._stored is not None:
            if not self._stored.done():
                return False
            self._stored = None  # stored, or not: another worker's copy may be there
        if not cache.available():
            return False
        return self._adopt(cache)

    def _adopt(self, cache: PackedCache) -> bool:
        linear = self.model.linear
        shared = (
            cache.load(self.model.matrices_to_check(), pack=linear.pack) if linear.packs else None
        )
        if shared is None:
            self._load_failed = True
            return False
        had_own = self.model.packed_units > 0 and not self.model.packing_shared
        self.model.adopt_packed(shared.matrices, shared.backing)
        if had_own:
            # Packed copies are many allocations of a few MiB, on oneDNN's threads: dropping
            # SmolLM2's (0.25 GiB, two threads) gave back 70-90 MiB without the trim, all
            # of it with it (``tests/functions/test_packing.py``).
            release_free_heap()
        self.release_unpacked()
        return True

    def unpack(self) -> int:
        """Drops the last packed layer's packed copy (``LlamaModel.unpack_weights``); the
        bytes of host RAM freed, 0 when nothing is packed or the copies are shared."""
        freed = self.model.unpack_weights()
        if freed:
            release_free_heap()
        return freed

    @property
    def cache(self) -> PackedCache | None:
        """Where the machine keeps the model's packed matrices, if anywhere (``share``)."""
        return self._cache

    @property
    def units(self) -> int:
        """Layers packed (or mapped), the LM head counting as one."""
        return self.model.packed_units

    @property
    def private_units(self) -> int:
        """Packed layers held in this process's own RAM that unpacking would give back (0
        when they are shared; ``LlamaModel.private_packed_units``)."""
        return self.model.private_packed_units

    @property
    def shared(self) -> bool:
        """Whether the model runs on packed matrices mapped from the host tier."""
        return self.model.packing_shared

    def next_bytes(self) -> int:
        """Host RAM the next ``pack(max_layers=1)`` will take; 0 when nothing is left to
        pack or packing is off."""
        return self.model.next_pack_bytes() if self.enabled else 0
