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
    """Two rows per model: every state beside the peers (the axis stops above transformers;
    a taller peer's bar is cut there and labelled with its time), then Ember's states alone,
    where their phases can be read."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no PNG: matplotlib is not installed (pip install matplotlib); {path} skipped")
        return
    fig, axes = plt.subplots(
        2, len(results), figsize=(7 * len(results), 8), squeeze=False, height_ratios=[1, 1]
    )
    for col, res in enumerate(results):
        _draw_model(axes[0][col], res, peers=True)
        _draw_model(axes[1][col], res, peers=False)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _draw_model(ax: Any, res: dict[str, Any], *, peers: bool) -> None:
    # Linear: stacked phases on a log axis would misstate their shares.
    states = res["states"]
    peer_names = ["transformers", "vllm"] if peers else []
    labels = [*states, *peer_names]
    bottom = [0.0] * len(labels)
    for ph in PHASES:
        heights = [res[f"phases_{s}"][ph] for s in states] + [0.0] * len(peer_names)
        ax.bar(labels, heights, bottom=bottom, label=ph)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    peer_s = [res[f"ttft_s_{p}"] or 0.0 for p in peer_names]
    if peers:
        ax.bar(labels[-2:], peer_s, color="grey", label="peer, total")
    ours = [res[f"ttft_s_{s}"] for s in states]
    floors = [res["import_torch_s"], res["import_torch_deferred_s"]]
    # The axis ends a little above Ember's slowest state and transformers: vLLM's tens
    # of seconds would flatten every other bar. A bar that is cut says its time at the top.
    top = 1.15 * max([*ours, *floors, *(peer_s[:1] if peers else [])])
    ax.set_ylim(0, top)
    for key, text, style in (
        ("import_torch_s", "import torch, a new interpreter", ":"),
        ("import_torch_deferred_s", "import torch as a new worker does (deferring)", "--"),
    ):
        ax.axhline(res[key], color="black", linestyle=style, linewidth=1, label=text)
    # Each phase is a median of its own, so a stack can end a little off its state's
    # median time: the label goes above whichever is higher.
    for x, (total, stack) in enumerate(zip([*ours, *peer_s], bottom, strict=True)):
        if not total:
            continue
        if total > top:
            ax.annotate(f"{total:.1f} s ↑", (x, top), ha="center", va="top", fontsize=8)
        else:
            y = max(total, stack)
            ax.annotate(f"{total:.3f} s", (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds to first token")
    title = res["model"] if peers else f"{res['model']}: Ember's states, phase by phase"
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
