"""Plot whole-model training steps (train_step.py JSONs, all layers) against issue #6's targets.

    python benchmarks/plot_whole_models.py OUT.png RESULT.json [RESULT.json ...]

One group of bars per model (the rows' context must be one and the same): transformers + PEFT, moetune with
every layer checkpointed, moetune with some layers checkpointed, moetune without recompute (checkpoint_layers 0; both
as chosen by auto, e.g. under --max-memory); the target is a
black tick. A later file's row replaces an earlier one's for the same model and variant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot_train_step import COLORS, LABELS, variant  # noqa: E402

# Issue #6, whole models on one H200 at 8K: (tokens/s, peak GiB).
TARGETS = {"qwen3-30b-a3b": (13_500, 66), "gpt-oss-20b": (18_000, 46), "glm-4.7-flash": (14_000, 64)}
VARIANTS = ("baseline", "moetune", "moetune-partial", "moetune-nockpt")


def load(paths: list[Path]) -> tuple[dict, dict, set, set]:
    rows, env, seqs, optims = {}, {}, set(), set()
    for path in paths:
        data = json.loads(path.read_text())
        env = data.get("environment", env)
        optims.add(data.get("args", {}).get("optim", "adamw"))
        for row in data["rows"]:  # replayed or not, one bar (the title says when moetune's were replayed)
            rows[(row["model"], variant(row, replays_apart=False))] = row
            seqs.add(row["seq"])
    return rows, env, seqs, optims


def plot(out: Path, paths: list[Path]) -> Path:
    rows, env, seqs, optims = load(paths)
    if len(seqs) != 1:
        raise SystemExit(f"RESULT.json: expected rows of one context, got {sorted(seqs)}")
    models = [m for m in TARGETS if any(k[0] == m for k in rows)] + sorted({k[0] for k in rows} - set(TARGETS))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(VARIANTS)
    for ax, key, index, title in ((axes[0], "tokens_per_s", 0, "tokens/s (higher is better)"),
                                  (axes[1], "peak_gib", 1, "peak GiB, max_memory_allocated (lower is better)")):
        for i, name in enumerate(VARIANTS):
            labelled = False
            for j, model in enumerate(models):
                row = rows.get((model, name))
                x = j + (i - (len(VARIANTS) - 1) / 2) * width
                if row is not None and row.get("oom"):  # a bar's place, with what became of it
                    ax.text(x, 0, "out of\nmemory", ha="center", va="bottom", fontsize=7, color=COLORS[name])
                    continue
                if row is None or row.get(key) is None:
                    continue
                ax.bar(x, row[key], width, color=COLORS[name], label=None if labelled else LABELS[name])
                labelled = True
                ax.text(x, row[key], f"{row[key]:,.0f}" if index == 0 else f"{row[key]:.1f}",
                        ha="center", va="bottom", fontsize=7)
        targeted = [(j, m) for j, m in enumerate(models) if m in TARGETS]
        for j, model in targeted:
            ax.hlines(TARGETS[model][index], j - 0.45, j + 0.45, colors="black", linewidth=1.5,
                      label="issue #6 target" if (j, model) == targeted[0] else None)
        layers = {m: next(r["layers"] for (mm, _), r in rows.items() if mm == m) for m in models}
        ax.set_xticks(range(len(models)), [f"{m}\n{layers[m]} layers" for m in models], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend above the bars
    axes[0].legend(fontsize=8, ncols=2)
    replayed = any(r.get("cuda_graph") for (_, name), r in rows.items() if name.startswith("moetune"))
    fig.suptitle(f"whole models, {next(iter(seqs)) // 1024}K tokens, batch 1, LoRA r=16 q/k/v/o + experts, "
                 f"{' / '.join(sorted(optims))}{', moetune replayed from a CUDA graph' if replayed else ''} - "
                 f"{env.get('device', '')}, {env.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(plot(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
