"""The host-tier plan of a pool: decided from the pool's size, the checkpoint's bytes and
free /dev/shm, in plain Python; and the release of a tier a killed pool left (the real
tier, filled and given back by a pool of real workers, is in ``test_manager.py``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember_warmpool.host_sharing import (
    auto_host_sharing,
    auto_host_sharing_from_origin,
    checkpoint_bytes,
    plan_host_sharing,
    release_host_tier,
    shm_free_bytes,
)
from ember_weights_store import ModelCatalog
from ember_weights_store.host_tier import HostTier

MIB = 1 << 20
GIB = 1 << 30


def test_one_worker_at_a_time_shares_nothing() -> None:
    plan = plan_host_sharing(max_workers=1, checkpoint_bytes=270 * MIB, shm_free_bytes=12 * GIB)
    assert not plan.enabled and plan.budget_bytes == 0
    assert "one worker" in plan.reason


def test_several_workers_get_room_for_their_packed_and_bound_copies() -> None:
    plan = plan_host_sharing(max_workers=4, checkpoint_bytes=270 * MIB, shm_free_bytes=12 * GIB)
    # Two copies as wide as float32 from bf16; the weights stay in the disk tier.
    assert plan.enabled and plan.budget_bytes == 4 * 270 * MIB
    assert "1080 MiB" in plan.reason and "given back" in plan.reason
    assert "disk tier" in plan.reason


def test_a_model_fetched_from_s3_keeps_its_chunks_in_the_tier_too(tmp_path: Path) -> None:
    from ember_functions.loading import StoreConfig

    plan = plan_host_sharing(
        max_workers=4, checkpoint_bytes=270 * MIB, shm_free_bytes=12 * GIB, holds_chunks=True
    )
    assert plan.budget_bytes == 5 * 270 * MIB and "fetched from the origin" in plan.reason
    origin = StoreConfig(origin="s3://models/team", endpoint_url="http://127.0.0.1:9")
    store, plan = auto_host_sharing_from_origin(
        origin,  # nothing installed: the size comes from the manifest
        weights_bytes=4000,
        max_workers=2,
        home=tmp_path / "home",
        shm=tmp_path,
    )
    assert plan.enabled and store.host_cache_bytes == 5 * 4000
    assert store.host_chunks and store.origin == origin.origin  # chunks land in host RAM
    assert store.endpoint_url == origin.endpoint_url


def test_the_budget_never_takes_more_than_half_of_free_shm() -> None:
    plan = plan_host_sharing(max_workers=2, checkpoint_bytes=2 * GIB, shm_free_bytes=10 * GIB)
    assert plan.budget_bytes == 5 * GIB  # not the 8 GiB it would like


def test_too_small_a_shm_turns_sharing_off_and_says_what_to_do() -> None:
    # Docker's default /dev/shm is 64 MiB.
    plan = plan_host_sharing(max_workers=2, checkpoint_bytes=270 * MIB, shm_free_bytes=64 * MIB)
    assert not plan.enabled
    assert "270 MiB" in plan.reason and "--shm-size" in plan.reason
    assert "host_cache_mib" in plan.reason


def test_inputs_are_measured_from_the_model_and_the_tmpfs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model = ModelCatalog(home).path_for("m")  # installed, so its workers load from the store
    model.mkdir(parents=True)
    (model / "model-00001.safetensors").write_bytes(b"x" * 3000)
    (model / "model-00002.safetensors").write_bytes(b"x" * 1000)
    (model / "tokenizer.json").write_bytes(b"{}" * 5000)  # not weights
    assert checkpoint_bytes(model) == 4000
    assert shm_free_bytes(tmp_path / "missing") == 0
    assert shm_free_bytes(tmp_path) > 0
    store, plan = auto_host_sharing(model, max_workers=3, home=home, shm=tmp_path)
    assert plan.enabled and store.host_cache_bytes == plan.budget_bytes == 4 * 4000
    assert not store.host_chunks  # the workers map the disk tier's chunks
    store, plan = auto_host_sharing(model, max_workers=3, home=home, shm=tmp_path / "missing")
    assert not plan.enabled and store.host_cache_bytes == 0


def test_a_model_served_from_its_own_directory_shares_nothing_and_says_how_to(
    tmp_path: Path,
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 4000)
    store, plan = auto_host_sharing(tmp_path, max_workers=3, home=tmp_path / "home")
    assert not plan.enabled and store.host_cache_bytes == 0
    assert f"ember models import {tmp_path} --name NAME" in plan.reason


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A home whose host tier, in /dev/shm and named after it, goes when the test ends:
    it outlives the home, which these tests never create."""
    home = tmp_path / "home"
    yield home
    shutil.rmtree(ModelCatalog(home).host_cache_root, ignore_errors=True)


def test_an_automatic_plan_first_gives_back_what_a_killed_pool_left(
    tmp_path: Path, home: Path
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"w" * 4000)
    tier = HostTier(ModelCatalog(home).host_cache_root, budget_bytes=1 << 20)
    tier.put("left-behind", b"x" * 4096)  # by a pool SIGKILLed before its close
    tier.put("mapped", b"y" * 4096)
    # While a live pool uses the tier, all of it stays: that pool gives it back itself
    # (an object it stored may not be pinned yet).
    tier.pin(["mapped"], owner="worker-of-a-live-pool")
    auto_host_sharing(tmp_path, max_workers=2, home=home)
    assert sorted(tier.keys()) == ["left-behind", "mapped"]
    tier.unpin("worker-of-a-live-pool")  # that pool is gone: nobody uses the tier
    auto_host_sharing(tmp_path, max_workers=2, home=home)
    assert tier.keys() == []


def test_a_closing_pool_gives_back_all_that_no_live_process_pins(
    tmp_path: Path, home: Path
) -> None:
    tier = HostTier(ModelCatalog(home).host_cache_root, budget_bytes=1 << 20)
    tier.put("ours", b"x" * 4096)
    tier.put("another-pools", b"y" * 4096)
    tier.pin(["another-pools"], owner="worker-of-another-pool")
    assert release_host_tier(home) == 4096 and tier.keys() == ["another-pools"]
    assert release_host_tier(tmp_path / "never-used") == 0
