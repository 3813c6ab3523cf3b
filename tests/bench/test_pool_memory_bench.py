"""bench/pool_memory.py runs end to end on SmolLM2 (one round, a pool of two) and shows
what it is there to show: two workers sharing what they derive from the model through the
host tier hold far less RAM between them than two on their own, and stopping the server,
by SIGTERM to its whole process group, leaves nothing in /dev/shm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ember_functions.weights import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pool_memory_bench_writes_its_json(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "pool.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pool_memory.py"), "--workers", "2",
         "--rounds", "1", "--home", str(ember_test_home), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # SmolLM2 is ~256 MiB of weights and ~256 MiB packed: alone, the second worker adds
    # its own packed copy; shared, it maps the first one's, the host tier's only object.
    # Both map the disk tier's chunks, and once packed they hand back their mappings of
    # the unpacked matrices (~200 MiB): those pages leave the pool (page cache,
    # reclaimable) either way. So two workers sharing hold far less themselves, and the
    # pool a packed copy less in all. Since a worker maps every page of the shared copy
    # when it adopts it (``populate_file_pages``, 2026-12-06, fifth session), the shared
    # workers' PSS counts that copy, split between them, where before an idle worker had
    # mapped little of it: 255 MiB less (was 512; 280 and 203 in other runs).
    assert result["pss_mib_alone_2"] - result["pss_mib_shared_2"] > 200, proc.stdout
    assert result["ram_mib_shared_2"] >= result["pss_mib_shared_2"]
    assert result["ram_mib_alone_2"] == result["pss_mib_alone_2"]  # no tier to add
    assert result["tier_mib_alone_2"] == 0
    assert result["ram_mib_alone_2"] - result["ram_mib_shared_2"] > 150, proc.stdout
    if cpu_has_native_bf16():
        assert 200 < result["tier_mib_shared_2"] < 400, proc.stdout
    else:
        # A CPU without bf16 compute binds the bf16 checkpoint in float32: the tier holds
        # the packed float32 copy (513 MiB) and what binding converts, the embedding
        # (108 MiB; 636 in all measured when the first layer was converted too, ~14 MiB
        # more, until the eleventh session). Before the tenth session
        # binding converted every matrix and the tier held those too (~1030), about
        # what the second worker's packed copy saved (2508 against 2557 MiB); now two
        # workers hold 1220 against 1859.
        assert 550 < result["tier_mib_shared_2"] < 750, proc.stdout
    assert result["tier_mib_after_stop_shared_2"] == 0, proc.stdout
    # Alone, both workers pack every layer; shared, one packs for both (the lease).
    assert result["layers_packed_alone_2"] == 2 * result["layers_packed_shared_2"] > 0
    assert result["settle_cpu_s_shared_2"] > 0 and result["settle_peak_private_mib_alone_2"] > 0
    assert result["settle_peak_anon_mib_shared_2"] > 0
    # Alone, the pool peaks as it settles, at two packed copies (875 MiB measured in bf16,
    # 1711 in float32); shared, at the packer's copy beside the other worker, which never
    # packs (622, 1044). The peak used to be sampled before the settled state only, every
    # 0.2 s, and missed the alone pool's (617 against 621 in a CI run, 2026-12-06). Before
    # the tenth session float32 CPUs peaked at their converted copies either way (2410
    # shared against 2400 alone).
    peak = result["settle_peak_anon_mib_alone_2"], result["settle_peak_anon_mib_shared_2"]
    assert peak[0] - peak[1] > 150, proc.stdout
