"""Plot an A/B benchmark JSON: GPU busy time per case, one bar per way, the ratio printed on the second.

Takes router_logits_ab.py's rows (tokens, way, gpu_busy_us), lora_order_ab.py's (model, part, first_ / last_
gpu_busy_ms) and sum_over_k_ab.py's cases (torch_us against the fastest tile of the kernel's sweep, which run 73 made
the default: GPU time of one call, not of a forward + backward).

    python benchmarks/plot_ab.py benchmarks/results/router-logits-ab-run68b-H100.json   # writes the .png beside it
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cases(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """(case labels, way labels, {(case, way): GPU busy us}) from either script's rows; repeated rounds: median."""
    values: dict[tuple[str, str], list[float]] = {}
    if rows and "torch_us" in rows[0]:  # sum_over_k_ab: one row a case, the kernel's tiles in its sweep
        for r in rows:
            tile = min(r["sweep"], key=lambda t: t["us"])
            label = f"{r['shape']} {r['tokens']}\n[{r['tokens']}, {r['K']}, {r['H']}]"
            values[(label, "torch sum(dim=1)")] = [r["torch_us"]]
            values[(label, "sum_over_k, the sweep's fastest tile")] = [tile["us"]]
    elif rows and "way" in rows[0]:  # router_logits_ab: one row a (tokens, way, round)
        for r in rows:
            values.setdefault((f"{r['tokens']} tokens", r["way"]), []).append(r["gpu_busy_us"])
    else:  # lora_order_ab: one row a (model, part), both orders in it
        for r in rows:
            for way in ("first", "last"):
                values.setdefault((f"{r['model']}\n{r['part']}", f"LoRA term {way}"), []).append(
                    r[f"{way}_gpu_busy_ms"] * 1e3)
    labels = list(dict.fromkeys(case for case, _ in values))
    ways = list(dict.fromkeys(way for _, way in values))
    return labels, ways, {key: statistics.median(v) for key, v in values.items()}


def plot(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = data["rows"] if "rows" in data else data["cases"]
    labels, ways, value = cases(rows)
    if len(ways) != 2:
        raise ValueError(f"{path}: expected two ways to compare, got {ways}")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.38
    for i, way in enumerate(ways):
        xs = [j + (i - 0.5) * width for j in range(len(labels))]
        heights = [value[(label, way)] for label in labels]
        bars = ax.bar(xs, heights, width, label=way)
        if i == 1:
            for bar, label in zip(bars, labels):
                ratio = value[(label, ways[0])] / value[(label, way)]
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("GPU us a call (do_bench)" if "cases" in data else "GPU busy us per forward+backward")
    env = data.get("environment", {})
    ax.set_title(f"{path.stem}: {env.get('device', '?')}, {env.get('date', '?')[:10]}\n"
                 f"(on the second bar: the first bar's time / its own)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(plot(Path(arg)))
