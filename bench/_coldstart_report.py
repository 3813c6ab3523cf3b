"""bench/coldstart.py's outputs: the table it prints and the stacked-bar PNG it draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PHASES = ("spawn", "imports", "manifest", "fetch", "decompress", "bind", "first_token")


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: time to first token, seconds (median of {res['rounds']})")
    head = f"{'state':<12}{'ttft':>8}{'x tfm':>8}  " + "".join(f"{p:>12}" for p in PHASES)
    print(head + "   tiers")
    for state in res["states"]:
        ph = res[f"phases_{state}"]
        speed = res[f"speedup_{state}"]
        print(
            f"{state:<12}{res[f'ttft_s_{state}']:>8.3f}"
            f"{(f'{speed:.1f}' if speed else '-'):>8}  "
            + "".join(f"{ph[p]:>12.3f}" for p in PHASES)
            + f"   {res['tiers'].get(state, '')}"
        )
    if "ttft_s_ready_no_prefix_cache" in res:
        t, speed = res["ttft_s_ready_no_prefix_cache"], res["speedup_ready_no_prefix_cache"]
        print(
            f"{'ready, no prefix cache':<12}{t:>8.3f}{(f'{speed:.1f}' if speed else '-'):>8}  "
            f"(ready reused {res['cached_tokens_ready']} of the prompt's "
            f"{res['prompt_tokens']} tokens: the chat preamble)"
        )
    for peer in ("transformers", "vllm"):
        t = res[f"ttft_s_{peer}"]
        note = res["peer_errors"].get(peer, "")
        print(f"{peer:<12}{(f'{t:.3f}' if t else '-'):>8}   {note}")
    print(
        f"{'import torch':<12}{res['import_torch_s']:>8.3f}{'':>8}  a new interpreter "
        "importing all of torch, nothing else, fastest of several"
    )
    ceiling = res["speedup_ceiling_new_interpreter"]
    print(
        f"{'  deferred':<12}{res['import_torch_deferred_s']:>8.3f}"
        f"{(f'{ceiling:.1f}' if ceiling else '-'):>8}  the same, deferring what a new "
        "worker defers until idle: the ceiling of object, disk and host"
    )


def draw(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no PNG: matplotlib is not installed (pip install matplotlib); {path} skipped")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        states = res["states"]
        labels = [*states, "transformers", "vllm"]
        bottom = [0.0] * len(labels)
        for ph in PHASES:
            heights = [res[f"phases_{s}"][ph] for s in states] + [0.0, 0.0]
            ax.bar(labels, heights, bottom=bottom, label=ph)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        peers = [res["ttft_s_transformers"] or 0.0, res["ttft_s_vllm"] or 0.0]
        ax.bar(labels[-2:], peers, color="grey", label="peer, total")
        # Linear: stacked phases on a log axis would misstate their shares.
        # The two floors lie ~0.2 s apart: one label above its line, the other below.
        for key, text, va in (
            ("import_torch_s", "import torch (new interpreter)", "bottom"),
            ("import_torch_deferred_s", "import torch, as a new worker does", "top"),
        ):
            ax.axhline(res[key], color="black", linestyle=":", linewidth=1)
            ax.annotate(text, (len(labels) - 0.5, res[key]), ha="right", va=va, fontsize=7)
        totals = [res[f"ttft_s_{s}"] for s in states] + peers
        for x, total in enumerate(totals):
            if total:
                ax.annotate(f"{total:.2f} s", (x, total), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("seconds to first token")
        ax.set_title(res["model"])
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
