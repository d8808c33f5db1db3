"""benchmarks/plot_train_step.py: which bar a result row is (its variant), and replayed rows kept apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import plot_train_step  # noqa: E402


def row(provider="moetune", seq=16384, layers=8, checkpoint_layers=None, cuda_graph=None, **extra):
    return {"model": "qwen3-30b-a3b", "provider": provider, "seq": seq, "layers": layers, "checkpoint_layers": checkpoint_layers,
            "cuda_graph": cuda_graph, "tokens_per_s": 1000.0, "peak_gib": 20.0, **extra}


def test_variant_names_checkpointing_and_replay():
    variant = plot_train_step.variant
    assert variant(row()) == "moetune"
    assert variant(row(checkpoint_layers=0)) == "moetune-nockpt"
    assert variant(row(checkpoint_layers=3)) == "moetune-partial"
    assert variant(row(checkpoint_plan={"checkpoint_layers": 0}, cuda_graph=True)) == "moetune-nockpt-graph"
    assert variant(row(checkpoint_layers=3, cuda_graph=True)) == "moetune-partial-graph"
    assert variant(row(cuda_graph=True)) == "moetune-graph"
    assert variant(row(provider="unsloth", gradient_checkpointing="off")) == "unsloth-nockpt"
    assert variant(row(provider="baseline", cuda_graph=False)) == "baseline"
    every = {variant(row(checkpoint_layers=c, cuda_graph=g)) for c in (None, 0, 3) for g in (False, True)}
    assert every <= set(plot_train_step.COLORS) and every <= set(plot_train_step.LABELS)


def test_replayed_and_eager_rows_of_one_context_are_both_plotted(tmp_path):
    eager, replayed = tmp_path / "auto.json", tmp_path / "graph.json"
    eager.write_text(json.dumps({"rows": [row(checkpoint_layers=0, cuda_graph=False)]}))
    replayed.write_text(json.dumps({"rows": [row(checkpoint_layers=0, cuda_graph=True, tokens_per_s=1100.0)]}))
    rows, _, _ = plot_train_step.load_rows([eager, replayed])
    assert {key: r["tokens_per_s"] for key, r in rows.items()} == {("moetune-nockpt", 16384): 1000.0,
                                                                   ("moetune-nockpt-graph", 16384): 1100.0}
    png = tmp_path / "plot.png"
    plot_train_step.plot(png, [eager, replayed])
    assert png.stat().st_size > 10_000
