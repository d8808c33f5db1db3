"""Plot an A/B benchmark JSON: GPU busy time per case, one bar per way, the ratio printed on the second.

Takes router_logits_ab.py's rows (tokens, way, gpu_busy_us), lora_order_ab.py's (model, part, first_ / last_
gpu_busy_ms), packed_attention_ab.py's (model, seq, path: mask or varlen, forward_backward_ms; a case one path could
not run, e.g. out of memory, is left out), sum_over_k_ab.py's cases (torch_us against the kernel with the run's default tile, or with --tile one
tile of its sweep: GPU time of one call, not of a forward + backward) and wgrad_split_ab.py's (the four LoRA
weight-gradient launches of a layer, unsplit against split, per routing).

    python benchmarks/plot_ab.py benchmarks/results/router-logits-ab-run68b-H100.json   # writes the .png beside it
    python benchmarks/plot_ab.py benchmarks/results/sum-over-k-ab-run73-H100.json --tile 1,2048,8
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cases(rows: list[dict], tile: tuple[int, int, int] | None = None) -> tuple[list[str], list[str], dict]:
    """(case labels, way labels, {(case, way): GPU busy us}) from either script's rows; repeated rounds: median."""
    values: dict[tuple[str, str], list[float]] = {}
    if rows and "routing" in rows[0]:  # wgrad_split_ab: one row a (case, routing), both ways in it
        if "split_ms" not in rows[0]:
            raise ValueError("wgrad_split_ab rows without timings (a --tiny run): nothing to plot")
        for r in rows:
            label = f"{r['shape']} {r['tokens']}\n{r['routing']}: busiest\n{r['busiest_over_mean']:.1f}x the mean"
            values[(label, "unsplit: one program an expert")] = [r["unsplit_ms"] * 1e3]
            values[(label, "split into chunks of rows")] = [r["split_ms"] * 1e3]
    elif rows and "bitwise_equal_torch" in rows[0]:  # sum_over_k_ab: one row a case
        if "torch_us" not in rows[0]:
            raise ValueError("sum_over_k_ab rows without timings (a --tiny run): nothing to plot")
        for r in rows:
            kernel_us, way = r["kernel_us"], "sum_over_k, the run's default tile"
            if tile is not None:  # one tile of the sweep, one measurement as torch's
                block_t, block_h, num_warps = tile
                chosen = [t for t in r.get("sweep", []) if (t["block_t"], t["num_warps"]) == (block_t, num_warps)
                          and t["block_h"] == min(block_h, max(16, 1 << (r["H"] - 1).bit_length()))]
                if not chosen:
                    raise ValueError(f"no {block_t} x {block_h} tile at {num_warps} warps in the sweep of {r['shape']}")
                kernel_us, way = chosen[0]["us"], f"sum_over_k, {block_t} x {block_h} tile, {num_warps} warps"
            label = f"{r['shape']} {r['tokens']}\n[{r['tokens']}, {r['K']}, {r['H']}]"
            values[(label, "torch sum(dim=1)")] = [r["torch_us"]]
            values[(label, way)] = [kernel_us]
    elif rows and "path" in rows[0]:  # packed_attention_ab: one row a (model, seq, path)
        for r in rows:
            if "forward_backward_ms" in r:
                label = f"{r['model']}\n{r['seq']} tokens\n{r['examples']} examples"
                way = "block-diagonal mask + sdpa" if r["path"] == "mask" else "varlen, no mask"
                values[(label, way)] = [r["forward_backward_ms"] * 1e3]
    elif rows and "way" in rows[0]:  # router_logits_ab: one row a (tokens, way, round)
        for r in rows:
            values.setdefault((f"{r['tokens']} tokens", r["way"]), []).append(r["gpu_busy_us"])
    else:  # lora_order_ab: one row a (model, part), both orders in it
        for r in rows:
            for way in ("first", "last"):
                values.setdefault((f"{r['model']}\n{r['part']}", f"LoRA term {way}"), []).append(
                    r[f"{way}_gpu_busy_ms"] * 1e3)
    ways = list(dict.fromkeys(way for _, way in values))
    labels = [case for case in dict.fromkeys(case for case, _ in values) if all((case, w) in values for w in ways)]
    return labels, ways, {key: statistics.median(v) for key, v in values.items()}


def plot(path: Path, tile: tuple[int, int, int] | None = None) -> Path:
    data = json.loads(path.read_text())
    rows = data["rows"] if "rows" in data else data["cases"]
    labels, ways, value = cases(rows, tile)
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
    ax.set_ylabel("GPU us, a layer's four launches (do_bench)" if rows and "routing" in rows[0] else
                  "GPU us a call (do_bench)" if "cases" in data else "us per forward+backward (CUDA events)"
                  if rows and "path" in rows[0] else "GPU busy us per forward+backward")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("--tile", type=lambda text: tuple(int(v) for v in text.split(",")), default=None,
                        metavar="BLOCK_T,BLOCK_H,WARPS", help="sum_over_k_ab: this tile of the sweep for the kernel's "
                        "bar (BLOCK_H capped at each case's H rounded up to a power of 2) instead of the run's default")
    args = parser.parse_args()
    for path in args.json:
        print(plot(path, args.tile))
