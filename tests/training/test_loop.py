"""The training loop's own pieces (the CLI runs of it are in test_train_cli.py)."""

from __future__ import annotations

import gc
import weakref

import pytest

from moetune.training import loop
from moetune.training.metrics import MetricsLog

from .helpers import run_cli


def test_collector_frozen_holds_what_is_alive_and_lets_go_after():
    before = gc.get_freeze_count()
    alive = [[i] for i in range(1000)]  # tracked containers, alive when the block starts
    with loop.collector_frozen():
        assert gc.get_freeze_count() >= before + len(alive)
        made_inside = {"x": []}  # objects made in the block stay collectable
        assert gc.is_tracked(made_inside)
    assert gc.get_freeze_count() == 0


def test_collector_frozen_unfreezes_on_error():
    try:
        with loop.collector_frozen():
            raise RuntimeError("a failed step")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0


def test_collector_frozen_lets_the_blocks_cycles_go_when_the_process_had_frozen_objects():
    """A process that starts with frozen objects (the lent GPU machines' Python: 375): the objects frozen by the
    block must still be collectable after it, or a deleted model's cycles keep their GPU memory (run 53)."""

    class Node:  # a reference cycle, as a model's modules and hooks make
        def __init__(self):
            self.me = self

    gc.freeze()  # someone else's freeze, before the block
    try:
        model = Node()
        gone = weakref.ref(model)
        with loop.collector_frozen():
            pass
        del model
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_a_nested_collector_frozen_block_leaves_the_freeze_to_the_outer_one():
    with loop.collector_frozen():
        assert gc.get_freeze_count() > 0
        with loop.collector_frozen():
            pass
        # still frozen for the rest of the outer block (an unfreeze empties the permanent generation). Not its exact
        # count: frozen objects freed by reference counting meanwhile leave it (pytest-xdist's worker thread frees
        # some: 753,405 -> 753,403 in a CI run).
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_the_training_steps_run_with_the_collector_frozen(tmp_path, capsys, monkeypatch):
    frozen_at_write = []
    write = MetricsLog.write

    def recording_write(self, row):
        frozen_at_write.append(gc.get_freeze_count())
        return write(self, row)

    monkeypatch.setattr(MetricsLog, "write", recording_write)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 2)
    assert code == 0, stderr
    assert len(frozen_at_write) == 2 and all(n > 0 for n in frozen_at_write)
    assert gc.get_freeze_count() == 0


def test_the_learning_rate_follows_transformers_cosine_with_min_lr_schedule(tmp_path, capsys):
    """Each step's lr as Trainer's lr_scheduler_type="cosine_with_min_lr" (min_lr_rate 0.1) gives it: the first
    warm-up step at 0, as in Trainer, so loss curves compare step for step."""
    import json

    import torch
    import transformers

    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 9,
                              "--warmup-steps", 3, "--lr", 0.01)
    assert code == 0, stderr
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "out" / "metrics.jsonl")]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = transformers.get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=3, num_training_steps=9,
                                           scheduler_specific_kwargs={"min_lr_rate": 0.1})
    expected = []
    for _ in range(9):
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert logged == expected and logged[0] == 0.0


def test_weight_decay_spares_biases_and_norms_as_trainer_does(tmp_path):
    """A trained router's bias (gpt-oss) gets no weight decay, as transformers' Trainer exempts biases and norm
    weights; the LoRA factors get it."""
    import torch

    from moetune import FastMoEModel

    from ..models.helpers import save_checkpoint

    model, _ = FastMoEModel.from_pretrained(save_checkpoint("gpt_oss", str(tmp_path / "m")), dtype=torch.float32)
    peft_model = FastMoEModel.get_peft_model(model, r=4, target_modules=["q_proj", "gate_up_proj"], train_router=True)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    decay, spared = loop.decay_groups(peft_model, 0.1)
    assert decay["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert spared["params"] and all(names[id(p)].endswith("bias") for p in spared["params"])
    assert any("router" in names[id(p)] for p in spared["params"])
    assert all("lora_" in names[id(p)] or "router" in names[id(p)] for p in decay["params"])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(spared["params"]) == len(trainable)
    assert loop.decay_groups(peft_model, 0.0) == trainable  # no decay: one group, as checkpoints before the split


def test_a_checkpoints_writing_is_not_counted_in_tokens_per_s(tmp_path, capsys, monkeypatch):
    import json
    import time

    real_save, clock = loop.save_checkpoint, [0.0]

    def perf_counter():  # a millisecond a reading: a step takes a few
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr(time, "perf_counter", perf_counter)

    def slow_save(*args, **kwargs):
        clock[0] += 1000.0  # a checkpoint that takes 1000 s to write
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 4, "--save-steps", 2)
    assert code == 0, stderr
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    # Steps of a few fake milliseconds: thousands of tokens/s. Counting a 1000 s save would give under 1.
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and min(row["tokens_per_s"] for row in rows) > 100, rows
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["checkpoint_seconds_this_session"] >= 2000 and summary["tokens_per_s_this_session"] > 100


def test_a_resumed_run_takes_its_own_schedule_from_the_first_step(tmp_path, capsys):
    """Resumed with a longer --max-steps, the first resumed step's lr is this run's schedule's, not the one the
    checkpoint saved for its shorter run."""
    import json

    common = ("--warmup-steps", 1, "--lr", 0.01, "--save-steps", 3)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "long", "--max-steps", 6, *common)
    assert code == 0, stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "cut", "--max-steps", 3, *common)
    assert code == 0, stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "cut", "--max-steps", 6, "--resume", *common)
    assert code == 0, stderr

    def lrs(run):
        return [json.loads(line)["lr"] for line in open(tmp_path / run / "metrics.jsonl")]

    assert lrs("cut")[3:] == lrs("long")[3:]


def test_a_resumed_run_takes_its_own_lr_and_weight_decay(tmp_path, capsys, monkeypatch):
    """--lr and --weight-decay given again on --resume are used from the first resumed step (the optimizer's and the
    schedule's saved states would otherwise bring the checkpoint's back, silently)."""
    import json

    from moetune.training import loop

    loaded = []
    real = loop.load_checkpoint

    def recording(path, model, optimizer, scheduler, *args, **kwargs):
        step = real(path, model, optimizer, scheduler, *args, **kwargs)
        loaded.append([(group["lr"], group["weight_decay"]) for group in optimizer.param_groups])
        return step

    monkeypatch.setattr(loop, "load_checkpoint", recording)
    common = ("--warmup-steps", 1, "--save-steps", 3, "--max-steps", 6)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "new", "--lr", 0.02, "--weight-decay",
                              0.2, *common)
    assert code == 0, stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "cut", "--lr", 0.01, "--weight-decay", 0.1,
                              *common[:-2], "--max-steps", 3)
    assert code == 0, stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "cut", "--resume", "--lr", 0.02,
                              "--weight-decay", 0.2, *common)
    assert code == 0, stderr

    def lrs(run):
        return [json.loads(line)["lr"] for line in open(tmp_path / run / "metrics.jsonl")]

    assert lrs("cut")[3:] == lrs("new")[3:] and lrs("cut")[:3] != lrs("new")[:3]
    assert {decay for _, decay in loaded[-1]} <= {0.2, 0.0} and 0.2 in {decay for _, decay in loaded[-1]}


def test_a_checkpoint_with_other_optimizer_groups_is_refused_in_one_line(tmp_path, capsys):
    from ..models.helpers import save_checkpoint
    from .helpers import write_jsonl

    model = save_checkpoint("gpt_oss", str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the router picks two experts for every token"}] * 8)
    common = ("--model", model, "--data", data, "--max-seq-length", 32, "--train-router", "--save-steps", 1)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 1,
                              "--weight-decay", 0.1, *common)  # the router's bias spared: two groups
    assert code == 0, stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 2, "--resume",
                              "--weight-decay", 0, *common)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "holds 2 optimizer parameter group(s), this run 1" in stderr and "--weight-decay" in stderr


def test_float16_trains_with_dynamic_loss_scaling(tmp_path, capsys, monkeypatch):
    """--dtype float16 scales the loss (torch.amp.GradScaler, as Trainer's fp16), unscales before clipping, skips
    the steps whose gradients overflow (the schedule waits) and resumes with the scaler's state."""
    import json

    import torch

    scalers = []
    real = torch.amp.GradScaler

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 4, "--dtype", "float16",
                              "--save-steps", 2, "--warmup-steps", 0)
    assert code == 0, stderr
    assert len(scalers) == 1 and scalers[0].get_scale() > 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    state = torch.load(out / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == scalers[0].get_scale()
    # A first step whose scaled gradients overflow is skipped: the scale backs off and the schedule waits.
    scalers.clear()

    class Overflowing(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, init_scale=2.0**40, backoff_factor=2.0**-24, **kwargs)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Overflowing)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "skip", "--max-steps", 3, "--dtype",
                              "float16", "--warmup-steps", 0, "--lr", 0.01)
    assert code == 0, stderr
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert scalers[0].get_scale() == 2.0**16  # backed off once
    assert lrs[0] == lrs[1] == 0.01 and lrs[2] < 0.01


def test_float16_refuses_what_its_loss_scaling_cannot_serve(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "a", "--dtype", "float16",
                              "--step-in-backward", "--max-grad-norm", 0)
    assert code == 2 and "--step-in-backward: not with --dtype float16" in stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "b", "--dtype", "float16", "--train-router")
    assert code == 2 and "loss scaling, which needs fp32 trained parameters" in stderr
    assert not (tmp_path / "b").exists()


def test_the_runs_expert_load_weighs_each_row_by_its_tokens():
    rows = [{"tokens": 30, "expert_load": {"3": [1.0, 0.0]}}, {"tokens": 10, "expert_load": {"3": [0.0, 1.0]}}]
    assert loop._mean_load(rows) == [[0.75, 0.25]]
    old_rows = [{"expert_load": {"1": [1.0, 0.0]}}, {"expert_load": {"1": [0.0, 1.0]}}]  # written before "tokens"
    assert loop._mean_load(old_rows) == [[0.5, 0.5]]


def test_a_non_finite_loss_is_written_as_null_and_the_summary_stays_json(tmp_path, capsys, monkeypatch):
    import json

    write = MetricsLog.write

    def diverged_first_row(self, row):
        return write(self, dict(row, loss=float("nan")) if row["step"] == 1 else row)

    monkeypatch.setattr(MetricsLog, "write", diverged_first_row)
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 2)
    assert code == 0, stderr

    def strict(text):
        return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))

    rows = [strict(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert rows[0]["loss"] is None and rows[1]["loss"] > 0 and rows[0]["tokens"] > 0
    summary = strict((tmp_path / "out" / "summary.json").read_text())
    # The first tenth (row 1) has no finite loss: unknown, not the next row's.
    assert summary["loss_first"] is None and summary["loss_last"] == rows[1]["loss"]


def test_a_short_runs_loss_plot_marks_its_points(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from moetune.training import plots

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plots.plot_loss([{"step": 1, "loss": 2.5, "lr": 0.0}], str(tmp_path / "loss.png"))
    lines = [line for ax in figures[0].axes for line in ax.get_lines()]
    assert len(lines) == 2 and all(line.get_marker() == "o" for line in lines)
    plots.plot_loss([{"step": s, "loss": 2.0, "lr": 1e-3} for s in range(1, 100)], str(tmp_path / "long.png"))
    assert all(line.get_marker() in ("None", None, "") for ax in figures[1].axes for line in ax.get_lines())


def test_float16_stops_when_every_step_overflows(tmp_path, capsys, monkeypatch):
    """Where the forward itself turns non-finite (diverged weights), fp16's scaler would skip every step from there
    on and the run would report success: once its scale falls below 1 the run stops with one line and exit 1, and
    writes no adapter or summary. A run whose last logged rows were skipped says its last loss is unknown."""
    import json

    import torch

    from moetune.training.loop import MIN_LOSS_SCALE

    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda *a, **kw: real_scaler(*a, init_scale=4.0 * MIN_LOSS_SCALE, **kw))
    forwards = [0]
    real = torch.nn.Embedding.forward

    def poisoned_from(first):
        def forward(self, ids):
            forwards[0] += 1
            out = real(self, ids)
            return out * float("nan") if forwards[0] >= first else out
        return forward

    monkeypatch.setattr(torch.nn.Embedding, "forward", poisoned_from(3))
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 8, "--save-steps", 2,
                              "--logging-steps", 1, "--dtype", "float16", "--warmup-steps", 0)
    last = stderr.strip().splitlines()[-1]
    # steps 3, 4, 5 skipped: the scale 4 -> 2 -> 1 -> 0.5
    assert code == 1 and last.startswith("moetune train: error: fp16's loss scale fell to 0.5 (every step's "
                                         "gradients overflow, so each is skipped) by step 5"), stderr
    assert "step-000004, is intact" in last and "Traceback" not in stderr  # (skipped steps change no weight)
    assert "or --dtype bfloat16 or float32" in last and "--overwrite" not in last  # (a checkpoint to resume)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()

    forwards[0] = 0
    monkeypatch.setattr(torch.nn.Embedding, "forward", poisoned_from(4))  # only the last step skipped
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "tail", "--max-steps", 4,
                                   "--logging-steps", 1, "--dtype", "float16", "--warmup-steps", 0)
    assert code == 0, stderr
    skipped = [json.loads(line)["loss"] is None for line in open(tmp_path / "tail" / "metrics.jsonl")]
    assert skipped == [False, False, False, True]
    summary = json.loads((tmp_path / "tail" / "summary.json").read_text())
    assert summary["loss_first"] is not None and summary["loss_last"] is None
    assert "-> n/a" in stdout


@pytest.mark.parametrize(("extra", "logging"), [
    ([], 2), (["--step-in-backward", "--max-grad-norm", 0], 2), ([], 5), (["--max-grad-norm", 0], 2),
], ids=["after-backward", "in-backward", "caught-at-the-save", "unclipped"])
def test_a_non_finite_loss_stops_the_run_before_it_writes_nan_weights(tmp_path, capsys, monkeypatch, extra,
                                                                       logging):
    """One step whose loss is NaN (here forced at the third step's forward) steps every trained weight to NaN: the
    run stops with one line and exit 1, writes no checkpoint, adapter or summary from those weights, and says which
    checkpoint is still good."""
    import torch

    forwards = [0]
    real = torch.nn.Embedding.forward

    def poisoned(self, ids):
        forwards[0] += 1
        out = real(self, ids)
        return out * float("nan") if forwards[0] == 3 else out

    monkeypatch.setattr(torch.nn.Embedding, "forward", poisoned)
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 6, "--save-steps", 2,
                              "--logging-steps", logging, "--checkpoint-layers", 0, *extra)
    last = stderr.strip().splitlines()[-1]  # (above it: the progress bar)
    # Advice the run does not follow already: clipping where it is off and the step in backward (which refuses it)
    # is not; fp16's dtype change only for fp16 runs.
    assert ("try a lower --lr than 0.003" in last) and ("--dtype" not in last)
    assert ("--max-grad-norm 1.0" in last) is (extra == ["--max-grad-norm", 0])
    assert code == 1 and stderr.count("error") == 1 and last.startswith("moetune train: error: the loss is nan by "
                                                                        "step 4"), stderr
    assert "step-000002" in last and "Traceback" not in stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_weights_made_non_finite_by_a_gradient_are_not_written_though_the_loss_was_finite(tmp_path, capsys,
                                                                                          monkeypatch):
    """A gradient that overflows while its loss stays finite steps the weights to NaN a step before any loss shows
    it: the weights themselves are checked before each checkpoint and the adapter."""
    import torch

    steps = [0]
    real = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == 2:
            next(p for group in self.param_groups for p in group["params"] if p.grad is not None).grad.fill_(
                float("inf"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 4, "--save-steps", 2,
                              "--logging-steps", 5, "--checkpoint-layers", 0)
    last = stderr.strip().splitlines()[-1]
    assert code == 1 and last.startswith("moetune train: error: a trained weight is not finite by step 2"), stderr
    assert last.endswith(f"no checkpoint was written); try a lower --lr than 0.003; start again with --overwrite "
                         f"--output-dir {out}"), last
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_a_bare_resume_of_a_checkpoint_without_its_settings_keeps_its_lr(tmp_path, capsys):
    """Checkpoints from before settings.json was written: a bare --resume takes the defaults for the flags not
    given, so the checkpoint's own learning rate must stay, not the default's."""
    import json
    import shutil

    common = ("--warmup-steps", 1, "--save-steps", 3)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "long", "--lr", 0.01, "--max-steps", 6,
                              *common)
    assert code == 0, stderr
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "cut", "--lr", 0.01, "--max-steps", 3,
                              *common)
    assert code == 0, stderr
    (tmp_path / "cut" / "checkpoints" / "step-000003" / "settings.json").unlink()
    shutil.rmtree(tmp_path / "cut" / "adapter")
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "cut", "--resume", "--max-steps", 6, *common)
    assert code == 0, stderr

    def lrs(run):
        return [json.loads(line)["lr"] for line in open(tmp_path / run / "metrics.jsonl")]

    assert lrs("cut")[3:] == lrs("long")[3:]


def test_a_step_leaves_nothing_of_its_graph_to_the_next_one(tmp_path, capsys, monkeypatch):
    """What autograd nodes hold as ctx attributes (moetune's LoRA Functions keep their factors' casts so) goes with the
    loss: the loop drops each micro-batch's loss after its backward, so the next forward does not run beside it."""
    import weakref

    import torch

    held, alive = [], []

    class Holding(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, anchor):
            ctx.plan = torch.zeros(4)
            held.append(weakref.ref(ctx.plan))
            return x + anchor

        @staticmethod
        def backward(ctx, grad):
            return grad, grad.sum()

    real = torch.nn.Embedding.forward
    anchor = torch.zeros((), requires_grad=True)  # puts the node in the graph (the embedding itself is frozen)

    def holding(self, ids):
        if held:
            alive.append(held[-1]() is not None)  # the previous forward's, at this forward's start
        out = real(self, ids)
        return Holding.apply(out, anchor.to(out.dtype))

    monkeypatch.setattr(torch.nn.Embedding, "forward", holding)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 3, "--grad-accum", 2,
                              "--checkpoint-layers", 0)
    assert code == 0, stderr
    assert len(alive) >= 5 and not any(alive)


def test_packed_rows_train_as_with_the_mask_through_varlen_attention(tmp_path, capsys, monkeypatch):
    """--packing where varlen attention is usable (a CUDA GPU: here forced, with the kernel's CPU stand-in) trains
    step for step as transformers' block-diagonal mask does, through the checkpointed layers (the memory plan and
    kept attention are GPU-only: tests/models covers the latter)."""
    from moetune.models import packed_attention

    from ..models.helpers import stand_in_varlen
    from .helpers import metrics, summary

    args = ("train", "--max-steps", 3, "--packing", "--batch-size", 2, "--max-seq-length", 96,
            "--checkpoint-layers", "auto")
    code, _, stderr = run_cli(capsys, *args, "--output-dir", tmp_path / "mask")
    assert code == 0, stderr
    calls = []
    monkeypatch.setattr(packed_attention, "usable", lambda *args: True)
    monkeypatch.setattr(packed_attention, "kernel", lambda *args: calls.append(args[3]) or stand_in_varlen(*args))
    code, _, stderr = run_cli(capsys, *args, "--output-dir", tmp_path / "varlen")
    assert code == 0, stderr
    assert summary(tmp_path / "mask")["attention"] == "sdpa"
    assert summary(tmp_path / "varlen")["attention"] == packed_attention.NAME
    assert any(len(cu) > 3 for cu in calls)  # rows of several examples: 2 rows and more than one segment
    want, got = ([r["loss"] for r in metrics(tmp_path / run)] for run in ("mask", "varlen"))
    assert got == pytest.approx(want, rel=1e-5)
