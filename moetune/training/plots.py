"""Plots of a run, from its metrics.jsonl rows (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_loss", "plot_expert_load"]


def plot_loss(rows: list[dict], path: str) -> None:
    """Training loss per step, with the learning rate on a second axis."""
    steps = [r["step"] for r in rows]
    marker = "o" if len(rows) <= 30 else None  # (a line of one point draws nothing)
    losses = [float("nan") if r["loss"] is None else r["loss"] for r in rows]  # null: a non-finite loss, a gap
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="tab:blue", label="loss", marker=marker, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:gray", alpha=0.6, linestyle="--", label="lr",
               marker=marker, markersize=3)
    lr_ax.set_ylabel("learning rate")
    fig.legend(loc="upper center", ncol=2, frameon=False)  # above the axes, clear of both axes' tick labels
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path)
    plt.close(fig)


def plot_expert_load(shares: list[list[float]], layers: list[int], path: str) -> None:
    """Heat map [MoE layer x expert] of the share of routed tokens each expert received over the run."""
    num_experts = len(shares[0])
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * num_experts, 16), min(1.5 + 0.4 * len(layers), 12)), dpi=110)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    ax.set_title(f"expert load (uniform = {1 / num_experts:.3f})")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
