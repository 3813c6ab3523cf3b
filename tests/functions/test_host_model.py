"""``HostModel.from_store``: the load's report accounts for the manifest it reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ember_functions.host_model import HostModel
from ember_weights_store import LocalBucketTier, WeightsStore

MANIFEST_DELAY_S = 0.05


class SlowManifests(LocalBucketTier):
    """A bucket whose manifests take ``MANIFEST_DELAY_S`` to read, as an object store's do."""

    def get(self, key: str) -> bytes:
        if key.startswith("manifests/"):
            time.sleep(MANIFEST_DELAY_S)
        return super().get(key)


def test_the_manifest_read_by_from_store_is_the_loads_manifest_phase(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = WeightsStore([SlowManifests(tmp_path / "bucket")])
    store.import_hf_dir(tiny_model("llama"), model_id="tiny")

    def load(**kwargs: object) -> HostModel:
        return HostModel.from_store(
            store,
            "tiny",
            tokenizer_cache=tmp_path / "tokenizers",
            **kwargs,  # type: ignore[arg-type]
        )

    read_here = load()
    assert read_here.report is not None
    assert read_here.report.manifest_s >= MANIFEST_DELAY_S  # was 0: the read went unreported
    given = load(manifest=read_here.manifest)  # read already, by a readahead or a zygote
    assert given.report is not None and given.report.manifest_s < MANIFEST_DELAY_S
