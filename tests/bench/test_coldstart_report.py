"""bench/coldstart.py's chart: drawn from a result as the bench writes it, peers and all,
with vLLM's tens of seconds cut off rather than flattening Ember's bars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def report(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("_coldstart_report")


def _result(model: str, scale: float, phases: tuple[str, ...]) -> dict[str, Any]:
    states = ["object", "disk", "host", "prewarmed", "prewarmed_s3", "ready"]
    ttft = dict(zip(states, [1.0, 0.7, 0.68, 0.1, 0.1, 0.02], strict=True))
    out: dict[str, Any] = {"model": model, "states": states}
    for state, t in ttft.items():
        out[f"ttft_s_{state}"] = t * scale
        out[f"phases_{state}"] = {ph: t * scale / len(phases) for ph in phases}
    out |= {"ttft_s_transformers": 3.1 * scale, "ttft_s_vllm": 25.0, "import_torch_s": 0.66}
    out["import_torch_deferred_s"] = 0.47
    return out


def test_the_chart_draws_every_model_and_cuts_the_tallest_peer(
    tmp_path: Path, report: ModuleType
) -> None:
    import matplotlib.pyplot as plt

    drawn: list[Any] = []
    real_savefig = plt.Figure.savefig

    def keep(fig: Any, *args: Any, **kwargs: Any) -> None:
        drawn.append(fig)
        real_savefig(fig, *args, **kwargs)

    out = tmp_path / "coldstart.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        no_vllm = {**_result("llama-1b", 3.0, report.PHASES), "ttft_s_vllm": None}  # missing
        report.draw([_result("smollm2", 1.0, report.PHASES), no_vllm], out)
    assert out.read_bytes().startswith(b"\x89PNG")
    (fig,) = drawn
    top, zoomed = fig.axes[0], fig.axes[2]  # SmolLM2: beside the peers, then alone
    assert 3.1 < top.get_ylim()[1] < 25.0  # transformers shows whole; vLLM is cut
    assert any(t.get_text() == "25.0 s ↑" for t in top.texts)
    assert zoomed.get_ylim()[1] < 3.1  # Ember's states alone, phases readable
    assert len(zoomed.patches) == 6 * len(report.PHASES)  # six states, a bar per phase, no peers
