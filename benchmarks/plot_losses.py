"""Loss curves of the providers in one train_step.py JSON, and their largest gap.

    python benchmarks/plot_losses.py RESULT.json      # writes RESULT-losses.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: Path) -> tuple[Path, float]:
    data = json.loads(path.read_text())
    curves = {row["provider"]: row["losses"] for row in data["rows"] if "losses" in row}
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for provider, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=provider)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    gap = 0.0
    if {"moetune", "baseline"} <= set(curves):
        diffs = [a - b for a, b in zip(curves["moetune"], curves["baseline"])]
        gap = max(abs(d) for d in diffs)
        gap_ax.plot(range(1, len(diffs) + 1), diffs)
        gap_ax.axhline(0, color="gray", lw=0.5)
        gap_ax.set_xlabel("step")
        gap_ax.set_ylabel("moetune - baseline")
    env = data.get("environment", {})
    init = "the same LoRA factors" if data.get("args", {}).get("same_lora_init") else "LoRA B = 0 in both"
    fig.suptitle(f"same base weights and data, {init} - {env.get('device', '')}, {env.get('date', '')[:10]}",
                 fontsize=10)
    fig.tight_layout()
    out = path.with_name(path.stem + "-losses.png")
    fig.savefig(out, dpi=110)
    return out, gap


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out, gap = plot(Path(sys.argv[1]))
    print(f"{out}  (largest gap {gap:.4f})")
