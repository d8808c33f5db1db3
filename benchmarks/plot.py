"""Plot an experts benchmark JSON: time and peak memory per shape/tokens, one bar per provider.

    python benchmarks/plot.py benchmarks/results/experts-H100.json   # writes the .png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The ratio against the baseline printed on each panel's bars.
RATIOS = {"ms": "speedup", "queued_ms": "speedup_queued", "peak_gib": "memory_ratio"}


def plot(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "ms" in r]
    groups = sorted({(r["shape"], r["tokens"]) for r in rows}, key=lambda g: (list(data["shapes"]).index(g[0]), g[1]))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    value = {(r["shape"], r["tokens"], r["provider"]): r for r in rows}
    panels = [("ms", "ms per forward+backward, each step alone"),
              ("peak_gib", "peak step memory, GiB (lower is better)")]
    if any("queued_ms" in r for r in rows):  # GPU time per step with steps queued back to back (harness.measure)
        panels.insert(1, ("queued_ms", "ms per forward+backward, steps queued back to back"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5))
    width = 0.8 / len(providers)
    for ax, (key, label) in zip(axes, panels):
        for i, provider in enumerate(providers):
            xs, ys, notes = [], [], []
            for j, (shape, tokens) in enumerate(groups):
                row = value.get((shape, tokens, provider))
                if row and key in row:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(row[key])
                    ratio = row.get(RATIOS[key])
                    notes.append(f"{ratio:.2f}x" if ratio and provider != "baseline" else "")
            ax.bar(xs, ys, width, label=provider)
            for x, y, note in zip(xs, ys, notes):
                ax.annotate(note, (x, y), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(groups)), [f"{s}\n{t} tok" for s, t in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("linear" if key == "peak_gib" else "log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    env = data["environment"]
    fig.suptitle(
        f"MoE experts block, bf16, LoRA r={rows[0]['rank']} on experts, frozen base - {env['device']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, {env['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(plot(Path(arg)))
