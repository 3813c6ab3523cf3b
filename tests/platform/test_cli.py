"""The `ember` CLI, driven through main() with real models and captured streams."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ember_platform.cli import main


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def test_generate_streams_and_reports_speed(tiny_model: object, tmp_path: Path) -> None:
    model = tiny_model("llama")  # type: ignore[operator]
    code, out, err = run(
        "--home", str(tmp_path), "generate", "hello", "--model", str(model), "--max-tokens", "8"
    )
    assert code == 0
    assert out.endswith("\n")
    assert "ttft" in err and "tok/s" in err and "completion tokens" in err


def test_unknown_model_is_a_clear_error_listing_what_exists(tmp_path: Path) -> None:
    code, _, err = run("--home", str(tmp_path), "generate", "hi", "--model", "no-such-model")
    assert code == 2
    assert "no-such-model" in err and "smollm2-135m" in err and "ember models add" in err


def test_bad_sampling_flag_is_a_clear_error(tiny_model: object, tmp_path: Path) -> None:
    model = tiny_model("llama")  # type: ignore[operator]
    code, _, err = run(
        "--home", str(tmp_path), "generate", "hi", "--model", str(model), "--top-p", "1.5"
    )
    assert code == 2 and "top_p" in err


def test_chat_keeps_history_and_resets(tiny_model: object, tmp_path: Path) -> None:
    model = tiny_model("qwen2")  # type: ignore[operator]
    code, _, err = run(
        "--home",
        str(tmp_path),
        "chat",
        "--model",
        str(model),
        "--max-tokens",
        "4",
        stdin="first\nsecond\n/reset\nthird\n/exit\n",
    )
    assert code == 0
    prompts = [line for line in err.splitlines() if line.startswith("[ttft")]
    counts = [int(line.split("·")[1].split()[0]) for line in prompts]
    # The second turn carries the first turn in its prompt; /reset drops it again.
    assert counts[1] > counts[0] and counts[2] == counts[0]
    assert "history cleared" in err


def test_models_list_shows_installable_default(tmp_path: Path) -> None:
    code, out, _ = run("--home", str(tmp_path), "models", "list")
    assert code == 0 and "smollm2-135m" in out and "ember models add smollm2-135m" in out


@pytest.mark.slow
def test_generate_on_the_default_model_knows_paris(
    ember_test_home: Path, smollm2_dir: Path
) -> None:
    code, out, err = run("--home", str(ember_test_home), "generate", "Name the capital of France.")
    assert code == 0, err
    assert "Paris" in out


def test_pool_status_says_when_a_worker_packed_only_part_of_its_model() -> None:
    from ember_platform.cli_pool import render

    row = {
        "model": "m",
        "worker_id": "w1",
        "pid": 7,
        "state": "READY",
        "warmth": "READY",
        "in_flight": 0,
        "idle_s": 1.0,
        "cold_start": {},
    }
    lines = render(
        [
            {
                **row,
                "pack_s": 0.25,
                "pack_stopped": None,
                "private_bytes": 183 << 20,
                "chunks_by_tier": {"disk": 17},
            },
            {**row, "worker_id": "w2", "pack_s": 0.1, "pack_stopped": "host RAM ran short"},
            {**row, "worker_id": "w3", "pack_s": None, "pack_stopped": None},
        ]
    ).splitlines()
    assert "0.250" in lines[1] and "partial" not in lines[1]
    assert "0.100 partial" in lines[2]
    assert lines[3].split()[7] == "-"
    column = lines[0].index("private MiB")  # cells are left-aligned under their heading
    assert lines[1][column:].split()[0] == "183"
    assert lines[2][column:].split()[0] == "-"  # not known: "-"
    column = lines[0].index("weights from")
    assert lines[1][column:].split()[0] == "disk" and lines[2][column:].split()[0] == "-"
