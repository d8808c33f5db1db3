"""The whole-model benchmark runs end to end at toy widths for each benchmarked model, from a checkpoint
on disk, and both providers train the same model (same first loss); its plot script draws the result;
the per-launch kernel benchmark runs under the interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-20b", "glm-4.7-flash"])
def test_tiny_whole_model_step_from_a_checkpoint(model, tmp_path):
    out = tmp_path / "step.json"
    _run(str(BENCH / "train_step.py"), "--tiny", "--model", model, "--layers", "2", "--seq", "32",
         "--warmup", "1", "--steps", "1", "--checkpoint", str(tmp_path / "ckpt"), "--profile", "moetune",
         "--out", str(out))
    assert (tmp_path / "ckpt" / "config.json").is_file()
    rows = {row["provider"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"moetune", "baseline"}
    moetune, baseline = rows["moetune"], rows["baseline"]
    assert moetune["trainable_params"] == baseline["trainable_params"] > 0
    assert abs(moetune["losses"][0] - baseline["losses"][0]) < 1e-4, (moetune["losses"], baseline["losses"])
    assert moetune["tokens_per_s"] > 0 and "groups_ms" in moetune["profile"]
    for row in (moetune, baseline):  # each timed step's host split
        host = row["step_host_s"]
        assert set(host) == {"queued_s", "busiest_cpu_s", "cpu_s", "runqueue_wait_s", "gc_s"}
        assert all(len(values) == 1 for values in host.values())
        assert 0 < host["queued_s"][0] <= row["step_times_s"][0]
        assert host["gc_s"][0] >= 0 and host["busiest_cpu_s"][0] <= host["cpu_s"][0] + 1e-6

    png = tmp_path / "step.png"
    _run(str(BENCH / "plot_train_step.py"), str(png), str(out))
    assert png.stat().st_size > 10_000
    host_png = tmp_path / "host.png"
    _run(str(BENCH / "plot_step_host.py"), str(host_png), str(out))
    assert host_png.stat().st_size > 10_000


def test_kernel_benchmark_runs_in_the_interpreter():
    proc = _run(str(BENCH / "bench_kernels.py"), "--tiny", "--shapes", "qwen3-30b-a3b", "--sweep", "fwd  down")
    assert proc.stdout.count("ms") > 8 and "SPLIT" not in proc.stdout  # the plain launch's candidates only
    assert proc.stdout.count(" -> ") == 4  # each LoRA input timed both ways


def test_same_lora_init_gives_the_same_loss_curve(tmp_path):
    """From the LoRA factors PEFT draws, moetune follows transformers+PEFT's loss curve step for step (fp32)."""
    out = tmp_path / "losses.json"
    _run(str(BENCH / "train_step.py"), "--tiny", "--layers", "2", "--seq", "48", "--warmup", "0", "--steps", "20",
         "--same-lora-init", "--out", str(out))
    curves = {row["provider"]: row["losses"] for row in json.loads(out.read_text())["rows"]}
    assert curves["moetune"][-1] < curves["moetune"][0] - 0.05  # it trains
    gap = max(abs(a - b) for a, b in zip(curves["moetune"], curves["baseline"]))
    assert gap < 1e-4, (gap, curves)


def test_checkpoint_layers_setting_is_recorded(tmp_path):
    """--checkpoint-layers 0 (no recompute) trains the same model to the same losses; the row says what ran (the
    fused rotary never runs on CPU: recorded as off)."""
    out = tmp_path / "nockpt.json"
    _run(str(BENCH / "train_step.py"), "--tiny", "--layers", "2", "--seq", "32", "--warmup", "0", "--steps", "3",
         "--providers", "moetune", "--checkpoint-layers", "0", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["checkpoint_layers"] == 0 and row["fused_rotary"] is False
    full = tmp_path / "full.json"
    _run(str(BENCH / "train_step.py"), "--tiny", "--layers", "2", "--seq", "32", "--warmup", "0", "--steps", "3",
         "--providers", "moetune", "--out", str(full))
    (row_full,) = json.loads(full.read_text())["rows"]
    assert row_full["checkpoint_layers"] is None
    assert row_full["losses"] == pytest.approx(row["losses"], abs=1e-6)
    auto = tmp_path / "auto.json"  # on CPU the planner keeps every layer checkpointed, and says why
    _run(str(BENCH / "train_step.py"), "--tiny", "--layers", "2", "--seq", "32", "--warmup", "0", "--steps", "3",
         "--providers", "moetune", "--checkpoint-layers", "auto", "--expandable-segments", "on", "--out", str(auto))
    result = json.loads(auto.read_text())
    (row_auto,) = result["rows"]
    assert row_auto["checkpoint_layers_asked"] == "auto" and row_auto["checkpoint_layers"] is None
    assert "cpu" in row_auto["checkpoint_plan"]["why"]
    # the CUDA allocator's peaks (its blocks, and as requested) and its setting are recorded; none on CPU
    assert result["args"]["expandable_segments"] == "on"
    assert set(result["environment"]["alloc_conf"].values()) == {"expandable_segments:True"}
    assert row_auto["peak_allocator"] is None and row_auto["plan_probe_allocator"] is None
    assert row_auto["losses"] == row_full["losses"]


def test_lora_groups_off_trains_to_the_same_losses(tmp_path):
    """--lora-groups off (each LoRA projection its own Function) against the default; the row says which ran."""
    rows = {}
    for setting in ("on", "off"):
        out = tmp_path / f"{setting}.json"
        _run(str(BENCH / "train_step.py"), "--tiny", "--layers", "2", "--seq", "32", "--warmup", "0", "--steps", "3",
             "--providers", "moetune", "--lora-groups", setting, "--out", str(out))
        (rows[setting],) = json.loads(out.read_text())["rows"]
        assert rows[setting]["lora_groups"] == setting
        assert rows[setting]["fused_routers"] == 0  # CPU: installed on CUDA only
    assert rows["on"]["grouped_lora_layers"] > 0 and rows["off"]["grouped_lora_layers"] == 0  # what ran
    assert rows["on"]["losses"] == pytest.approx(rows["off"]["losses"], rel=1e-5)


def test_whole_model_plot(tmp_path):
    """plot_whole_models.py draws one group per model from train_step rows (and refuses mixed contexts)."""
    rows = [
        {"model": "qwen3-30b-a3b", "layers": 48, "seq": 8192, "provider": "baseline", "tokens_per_s": 4836.0,
         "peak_gib": 79.6},
        {"model": "qwen3-30b-a3b", "layers": 48, "seq": 8192, "provider": "moetune", "tokens_per_s": 10807.0,
         "peak_gib": 69.1, "checkpoint_layers": None},
        {"model": "qwen3-30b-a3b", "layers": 48, "seq": 8192, "provider": "moetune", "tokens_per_s": 16090.0,
         "peak_gib": 91.7, "checkpoint_layers": "auto", "checkpoint_plan": {"checkpoint_layers": 0}},
    ]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps({"environment": {"device": "test"}, "rows": rows}))
    png = tmp_path / "whole.png"
    _run(str(BENCH / "plot_whole_models.py"), str(png), str(data))
    assert png.stat().st_size > 10_000
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"rows": [dict(rows[0], seq=4096), rows[1]]}))
    proc = subprocess.run([sys.executable, str(BENCH / "plot_whole_models.py"), str(png), str(mixed)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "expected rows of one context" in proc.stderr


def test_whole_model_plot_marks_out_of_memory_and_replays(tmp_path, monkeypatch):
    """A baseline that ran out of memory keeps its place with a note; moetune's replays are named in the title."""
    import matplotlib.figure

    monkeypatch.syspath_prepend(str(BENCH))
    import plot_whole_models

    rows = [
        {"model": "qwen3-30b-a3b", "layers": 48, "seq": 8192, "provider": "baseline", "oom": True},
        {"model": "qwen3-30b-a3b", "layers": 48, "seq": 8192, "provider": "moetune", "tokens_per_s": 14319.0,
         "peak_gib": 65.95, "checkpoint_plan": {"checkpoint_layers": 47}, "cuda_graph": True},
    ]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps({"environment": {"device": "test"}, "rows": rows}))
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    plot_whole_models.plot(tmp_path / "whole.png", [data])
    (fig,) = figures
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("out of\nmemory") == 2 and "14,319" in texts  # both panels
    assert "moetune replayed from a CUDA graph" in fig._suptitle.get_text()


def test_step_in_backward_ab_alternates_on_one_model(tmp_path):
    out = tmp_path / "ab.json"
    _run(str(BENCH / "step_in_backward_ab.py"), "--tiny", "--layers", "2", "--rounds", "2", "--warmup", "1",
         "--steps", "2", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["step_in_backward"]) for r in rows] == [(0, False), (0, True), (1, False), (1, True)]
    assert all(len(r["step_times_s"]) == 2 and r["tokens_per_s"] > 0 for r in rows)
    losses = [loss for r in rows for loss in r["losses"]]
    assert losses[-1] < losses[0]  # one model trains on through both settings


def test_a_plan_changed_by_the_last_warm_up_check_gets_a_checked_step_before_timing(monkeypatch):
    sys.path.insert(0, str(BENCH))
    import torch
    import train_step

    calls = []
    monkeypatch.setattr(train_step, "training_step", lambda model, optimizer, ids: calls.append("step") or torch.tensor(1.0))
    answers = iter([False, True, False])  # the plan changes after the second warm-up step, then holds

    def check():
        calls.append("check")
        return next(answers)

    times, losses, _, _ = train_step.time_steps(None, None, None, 2, 3, torch.device("cpu"), check)
    assert calls == ["step", "check", "step", "check", "step", "check", "step", "step", "step"]
    assert len(times) == 3 and len(losses) == 6


def test_a_step_keeps_nothing_of_its_graph_alive():
    """The returned loss is detached, as Trainer's: kept by the timing loop until the next step returns, an attached
    loss held the whole previous graph, and what its nodes hold as ctx attributes (the LoRA factors' casts), at
    the next step's peak."""
    sys.path.insert(0, str(BENCH))
    import gc
    import weakref

    import torch
    import train_step

    held = []

    class Holding(torch.autograd.Function):  # keeps a tensor on ctx, as moetune's LoRA Functions keep their factors' casts
        @staticmethod
        def forward(ctx, x):
            ctx.plan = torch.arange(4.0)
            held.append(weakref.ref(ctx.plan))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    model = torch.nn.Linear(4, 4)

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def forward(input_ids, labels):
        return Out(Holding.apply(model(input_ids)).square().mean())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_step.training_step(forward, optimizer, torch.randn(2, 4))
    gc.collect()
    assert not loss.requires_grad and held[0]() is None


def test_the_baseline_runs_after_moetune_without_its_process_wide_swaps(monkeypatch, tmp_path):
    """moetune's provider wraps transformers' flex attention for the process (gpt-oss's sinks, on CUDA); the
    baseline measured after it in the same process must run transformers' own function."""
    import transformers

    sys.path.insert(0, str(BENCH))
    import train_step

    from moetune.models import fast_sinks

    mapping = transformers.AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "flex_attention", mapping["flex_attention"])
    real_build_moetune, real_build_baseline, seen = train_step.build_moetune, train_step.build_baseline, []

    def build_moetune(*args, **kwargs):
        model = real_build_moetune(*args, **kwargs)
        fast_sinks.install_fast_sinks()  # what from_pretrained does on CUDA for gpt-oss with flex attention
        return model

    def build_baseline(*args, **kwargs):
        seen.append(fast_sinks.wrapped())
        return real_build_baseline(*args, **kwargs)

    monkeypatch.setattr(train_step, "build_moetune", build_moetune)
    monkeypatch.setattr(train_step, "build_baseline", build_baseline)
    with warnings.catch_warnings():  # the baseline calls transformers as users of 5.17 do (deprecated in 5.25)
        warnings.simplefilter("ignore", FutureWarning)
        assert train_step.main(["--tiny", "--model", "gpt-oss-20b", "--layers", "2", "--seq", "32", "--warmup", "0",
                                "--steps", "1", "--providers", "moetune", "baseline", "--out",
                                str(tmp_path / "step.json")]) == 0
    assert seen == [False]


def test_cuda_graph_replays_the_timed_steps_or_says_it_needs_a_gpu(tmp_path):
    """`--cuda-graph on`: moetune's timed steps are replays of one step captured after the warm-up (bf16 AdamW
    stepped in backward, as issue #6's whole-model runs); without a GPU, a one-line refusal."""
    import torch

    args = [str(BENCH / "train_step.py"), "--tiny", "--layers", "2", "--seq", "64", "--providers", "moetune",
            "--optim", "adamw_bf16", "--step-in-backward", "--cuda-graph", "on", "--warmup", "2", "--steps", "3",
            "--out", str(tmp_path / "graph.json")]
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "--cuda-graph on: CUDA graphs need a CUDA GPU" in proc.stderr
        assert "Traceback" not in proc.stderr
        return
    _run(*args)
    (row,) = json.loads((tmp_path / "graph.json").read_text())["rows"]
    assert row["cuda_graph"] is True and row["step_in_backward"] is True
    assert len(row["losses"]) == 5 and row["losses"][-1] < row["losses"][0]  # warm-up, then replays that train
    assert row["tokens_per_s"] > 0 and row["peak_gib"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--optim", "adamw_8bit"], "--optim: --cuda-graph on runs adamw or adamw_bf16, got adamw_8bit"),
    (["--profile", "moetune"], "--profile / --memory-peak moetune: they run eager steps, not replays"),
])
def test_cuda_graph_refuses_what_a_replay_cannot_be(extra, message):
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--cuda-graph", "on", *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
