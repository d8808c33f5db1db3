"""Plot whole-model training-step JSONs (train_step.py, unsloth_step.py): tokens/s and peak GiB per context.

    python benchmarks/plot_train_step.py OUT.png RESULT.json [RESULT.json ...]

Rows of every file are pooled by (variant, seq); a later file's row replaces an earlier one's. A variant is the
provider and its checkpointing: moetune with checkpoint_layers=0 (or some layers only) and Unsloth with
--gradient-checkpointing off are bars of their own, and so are moetune's steps replayed from a CUDA graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"baseline": "tab:gray", "unsloth": "tab:orange", "unsloth-nockpt": "moccasin", "moetune": "tab:green",
          "moetune-partial": "mediumseagreen", "moetune-nockpt": "darkgreen", "moetune-graph": "yellowgreen",
          "moetune-partial-graph": "darkseagreen", "moetune-nockpt-graph": "olive"}
LABELS = {"baseline": "transformers + PEFT", "unsloth": "Unsloth", "unsloth-nockpt": "Unsloth, no checkpointing",
          "moetune": "moetune", "moetune-partial": "moetune, some layers checkpointed",
          "moetune-nockpt": "moetune, no checkpointing",
          "moetune-graph": "moetune, replayed (CUDA graph)",
          "moetune-partial-graph": "moetune, some layers checkpointed, replayed (CUDA graph)",
          "moetune-nockpt-graph": "moetune, no checkpointing, replayed (CUDA graph)"}


def variant(row: dict, replays_apart: bool = True) -> str:
    """The provider, with "-nockpt" where no layer was checkpointed and "-partial" where some were (as chosen,
    also by checkpoint_layers auto), then (replays_apart) "-graph" where the timed steps were replayed from a CUDA
    graph."""
    layers = (row.get("checkpoint_plan") or {}).get("checkpoint_layers", row.get("checkpoint_layers"))
    graph = "-graph" if replays_apart and row.get("cuda_graph") else ""
    if layers == 0 or row.get("gradient_checkpointing") == "off":
        return row["provider"] + "-nockpt" + graph
    if isinstance(layers, int) and layers < row.get("layers", layers + 1):
        return row["provider"] + "-partial" + graph
    return row["provider"] + graph


def load_rows(paths: list[Path]) -> tuple[dict, dict, dict]:
    rows, env, args = {}, {}, {}
    for path in paths:
        data = json.loads(path.read_text())
        env = env or data.get("environment", {})
        args = args or data.get("args", {})
        for row in data["rows"]:
            rows[(variant(row), row["seq"])] = row
    return rows, env, args


def plot(out: Path, paths: list[Path]) -> Path:
    rows, env, args = load_rows(paths)
    providers = [p for p in COLORS if any(k[0] == p for k in rows)]
    seqs = sorted({seq for _, seq in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / max(len(providers), 1)
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak_gib", "peak GiB, max_memory_allocated (lower is better)")):
        for i, provider in enumerate(providers):
            labelled = False
            for j, seq in enumerate(seqs):
                row = rows.get((provider, seq))
                x = j + (i - (len(providers) - 1) / 2) * width
                if row is None or row.get("oom") or row.get(key) is None:  # not run, out of memory, no CUDA
                    note = "-" if row is None else "OOM" if row.get("oom") else "n/a"
                    ax.text(x, 0, note, ha="center", va="bottom", fontsize=7, rotation=90)
                    continue
                ax.bar(x, row[key], width, color=COLORS[provider], label=None if labelled else LABELS[provider])
                labelled = True
                ax.text(x, row[key], f"{row[key]:,.0f}" if key == "tokens_per_s" else f"{row[key]:.1f}",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(seqs)), [f"{s // 1024}K" for s in seqs])
        ax.set_xlabel("context (tokens, batch 1)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    model = next(iter(rows.values()))
    rank, optim = args.get("rank", 16), args.get("optim", "adamw")
    fig.suptitle(f"{model['model']} x{model['layers']} layers, LoRA r={rank} q/k/v/o + experts, {optim} - "
                 f"{env.get('device', '')}, {env.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(plot(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
