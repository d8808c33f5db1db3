"""moetune train --cuda-graph: fixed padded batches without a mask train as the eager loop's, the graph is recorded
once after the eager steps, and the learning rate is a tensor the schedule fills."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from moetune.training import graphed_step
from moetune.training.config import TrainConfig, validate
from moetune.training.graphed_step import for_eager, for_graph
from moetune.training.loop import run
from moetune.training.prepare import prepare

from .helpers import metrics, run_cli, summary


def _train(output_dir, cuda_graph: bool, **settings) -> tuple[dict, list[dict]]:
    """The demo model trained in this process; cuda_graph set on the prepared plan (prepare refuses it off CUDA)."""
    config = TrainConfig(output_dir=str(output_dir), **settings)
    plan = prepare(config)
    plan.config = dataclasses.replace(plan.config, cuda_graph=cuda_graph)
    return run(plan), metrics(output_dir)


def _nine_records(tmp_path) -> str:
    """The demo's first 9 records: with 2 a micro-batch and 2 a step, 3 steps an epoch, the third one micro-batch of
    one record (the graph's second micro-batch all padding)."""
    from moetune.training.prepare import DEMO_DIR

    with open(os.path.join(DEMO_DIR, "data.jsonl")) as f:
        lines = f.readlines()[:9]
    path = tmp_path / "nine.jsonl"
    path.write_text("".join(lines))
    return str(path)


# fp32 on CPU, rows 32 tokens (the demo's longest record has 28), AdamW with bf16 states
SETTINGS = dict(batch_size=2, grad_accum=2, optim="adamw_bf16", lr=1e-3, warmup_steps=2, save_steps=100,
                dtype="float32", max_seq_length=32)


def _close(rows, want_rows, key, rtol):
    torch.testing.assert_close(torch.tensor([r[key] for r in rows], dtype=torch.float64),
                               torch.tensor([r[key] for r in want_rows], dtype=torch.float64), rtol=rtol, atol=0)


def test_padded_batches_without_a_mask_train_as_the_eager_loop_and_the_graph_comes_after_two_steps(tmp_path,
                                                                                                 monkeypatch):
    """On CPU, with the capture replaced by the step itself: the graphed loop's losses, learning rates, token counts,
    expert loads and adapter are the eager loop's, with grad_accum 2, clipping on, and a short step of one micro-batch
    (before and after the capture); the graph is recorded once, before the third step. Not bitwise: the graph's rows
    are all 32 tokens long (other matmul shapes) and its attention has no mask, and the bf16 states' stochastic
    rounding turns the last-bit differences into an ulp here and there, which grow a little each step."""
    captures = []

    def fake_capture(step, warmup, stream):
        captures.append((warmup, stream is step.__self__.side))
        return lambda: step().clone()

    monkeypatch.setattr(graphed_step, "capture_step", fake_capture)
    settings = dict(SETTINGS, data=_nine_records(tmp_path), max_steps=6, max_grad_norm=0.5)
    eager, eager_rows = _train(tmp_path / "eager", False, **settings)
    graphed, graphed_rows = _train(tmp_path / "graphed", True, **settings)
    assert captures == [(0, True)]  # once, without warm-up steps of its own (the eager steps were), on their stream
    assert graphed["cuda_graph_first_replayed_step"] == 3 and eager["cuda_graph_first_replayed_step"] is None
    assert [r["tokens"] for r in graphed_rows] == [r["tokens"] for r in eager_rows]  # real tokens, not the padding
    _close(graphed_rows, eager_rows, "loss", 1e-4)
    _close(graphed_rows, eager_rows, "lr", 1e-7)  # (a float32 tensor's rate)
    for got, want in zip(graphed_rows, eager_rows):
        for layer in want["expert_load"]:
            torch.testing.assert_close(torch.tensor(got["expert_load"][layer]), torch.tensor(want["expert_load"][layer]),
                                       rtol=0, atol=0.02)
    assert eager_rows[-1]["loss"] < eager_rows[0]["loss"]  # it trained
    from safetensors.torch import load_file

    weights = [load_file(os.path.join(tmp_path, run_, "adapter", "adapter_model.safetensors"))
               for run_ in ("eager", "graphed")]
    for name, value in weights[0].items():  # as a whole: bf16 states (rounding at 2^-8) round some elements apart
        assert (weights[1][name] - value).norm() <= 1e-2 * value.norm(), name


def _capturable(optimizer) -> list[bool]:
    """Each group's capturable, and each of the step in backward's chunk optimizers' groups (the ones that step)."""
    groups = list(optimizer.param_groups)
    for _, inner, _ in getattr(optimizer, "_chunks", ()):
        groups += inner.param_groups
    return [bool(g.get("capturable")) for g in groups]


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_a_checkpoint_written_under_the_graph_resumes_eagerly_and_back(tmp_path, monkeypatch, step_in_backward):
    """The graphed run's checkpoint holds a tensor learning rate and capturable groups; an eager resume takes a float
    and capturable off, a graphed resume of an eager checkpoint a tensor and capturable on again (torch's
    load_state_dict takes the saved groups' settings): at the capture every group the graph records is capturable,
    and both continue the uninterrupted run's schedule and losses."""
    at_capture = []

    def fake_capture(step, warmup, stream):
        at_capture.append(_capturable(step.__self__.optimizer))
        return lambda: step().clone()

    monkeypatch.setattr(graphed_step, "capture_step", fake_capture)
    settings = dict(SETTINGS, data=_nine_records(tmp_path), max_grad_norm=0, save_steps=3, grad_accum=1,
                    step_in_backward=step_in_backward)
    _, whole = _train(tmp_path / "whole", False, max_steps=7, **settings)
    for first, then in ((True, False), (False, True)):
        out = tmp_path / f"cut-{first}"
        _train(out, first, max_steps=3, **settings)
        _, resumed = _train(out, then, max_steps=7, resume=True, **settings)
        assert [r["step"] for r in resumed] == list(range(1, 8))
        _close(resumed, whole, "lr", 1e-7)
        _close(resumed, whole, "loss", 1e-4)
    assert len(at_capture) == 2 and all(flags and all(flags) for flags in at_capture)


def test_for_graph_and_back():
    """for_graph: capturable groups with float32 device-tensor rates (what torch's load_state_dict took from an eager
    checkpoint is replaced); for_eager: floats and capturable off."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=0.25, capturable=True)
    optimizer.load_state_dict(torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}],
                                                lr=0.25).state_dict())
    assert not any(g["capturable"] for g in optimizer.param_groups)  # torch took the saved groups' setting
    for_graph(optimizer, torch.device("cpu"))
    assert all(isinstance(g["lr"], torch.Tensor) and g["lr"].dtype == torch.float32 for g in optimizer.param_groups)
    assert [float(g["lr"]) for g in optimizer.param_groups] == [0.25, 0.5]
    assert all(g["capturable"] for g in optimizer.param_groups)
    for_eager(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.5]
    assert not any(g["capturable"] for g in optimizer.param_groups)


def test_a_model_whose_router_aux_loss_needs_the_mask_is_refused(tmp_path, capsys):
    """output_router_logits in the model's config: transformers' load-balancing loss leaves the padding out through
    the attention mask, which the graph's batches do not carry."""
    from moetune.training.prepare import DEMO_DIR

    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(DEMO_DIR):
        if name != "data.jsonl":
            (model / name).write_bytes(open(os.path.join(DEMO_DIR, name), "rb").read())
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "output_router_logits": True}))
    code, _, stderr = run_cli(capsys, "train", "--model", model, "--output-dir", tmp_path / "out", "--cuda-graph")
    assert code == 2 and "--cuda-graph: not with a model whose config sets output_router_logits" in stderr
    assert not os.path.exists(tmp_path / "out")


def test_router_jitter_is_refused_like_dropout():
    from moetune.training.cuda_graph import without_rng_state

    block = torch.nn.Module()
    block.jitter_noise = 0.01
    with pytest.raises(ValueError, match="needs no router jitter"):
        without_rng_state(torch.nn.Sequential(block))


def test_a_failed_capture_names_the_flag(monkeypatch):
    def failing_capture(step, warmup, stream):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(graphed_step, "capture_step", failing_capture)
    step = graphed_step.GraphedStep(torch.nn.Linear(1, 1), None, [], None, TrainConfig(), torch.device("cpu"), pad_id=0)
    with pytest.raises(RuntimeError, match=r"^--cuda-graph: the training step could not be recorded as a CUDA graph "
                                           r"\(operation not permitted when stream is capturing\); run without"):
        step.run(capture=True)


def test_fill_pads_every_micro_batch_and_counts_the_real_labels(tmp_path):
    from moetune.training.data import IGNORE, Example

    class Stub(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("not run here")

    config = TrainConfig(batch_size=2, grad_accum=3, max_seq_length=6, max_grad_norm=0)
    step = graphed_step.GraphedStep(Stub(), None, [], None, config, torch.device("cpu"), pad_id=9)
    short = Example(input_ids=[1, 2, 3], labels=[IGNORE, 2, 3])
    full = Example(input_ids=[4, 5, 6, 7, 8, 1], labels=[4, 5, IGNORE, 7, 8, 1])
    tokens = step.fill([[[short], [full]], [[short]]])
    assert tokens == 3 + 6 + 3
    assert step.inputs[0]["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9], [4, 5, 6, 7, 8, 1]]
    assert step.inputs[0]["labels"].tolist() == [[IGNORE, 2, 3] + [IGNORE] * 3, [IGNORE, 5, IGNORE, 7, 8, 1]]
    assert step.inputs[1]["token_mask"].tolist() == [[True] * 3 + [False] * 3, [False] * 6]
    assert not step.inputs[2]["token_mask"].any() and (step.inputs[2]["labels"] == IGNORE).all()
    assert int(step.num_items) == 2 + 4 + 2  # the first label of each row is not predicted
    with pytest.raises(ValueError, match="micro_batches: expected at most 3"):
        step.fill([[[short]]] * 4)


@pytest.mark.parametrize("flags, message", [
    (dict(packing=True), "--cuda-graph: not with --packing"),
    (dict(dtype="float16"), "--cuda-graph: not with --dtype float16"),
    (dict(optim="adamw_8bit"), "--cuda-graph: not with --optim adamw_8bit"),
])
def test_what_a_graph_cannot_hold_is_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(cuda_graph=True, **flags))


def test_the_cli_refuses_a_graph_off_cuda_in_one_line(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--device", "cpu", "--cuda-graph")
    assert code == 2 and "--cuda-graph: records the step on a CUDA GPU, but the device is cpu" in stderr
    assert "Traceback" not in stderr and not os.path.exists(tmp_path / "out")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim", ["adamw", "adamw_bf16"])
def test_the_replayed_steps_train_as_the_eager_ones_on_cuda(tmp_path, capsys, optim):
    """The demo on the GPU, 10 steps, graph against eager (the graph's rows padded to --max-seq-length, no mask; the
    eager rows to the longest of their batch, with one): losses and learning rates agree to bf16's noise. The graph
    comes after two eager steps and the memory plan's checks (three steps that autotuned nothing)."""
    common = ("--max-steps", 10, "--optim", optim, "--warmup-steps", 2, "--lr", 2e-3, "--batch-size", 4,
              "--grad-accum", 2, "--save-steps", 100, "--max-seq-length", 32)
    runs = {}
    for name, flags in (("eager", ()), ("graphed", ("--cuda-graph",))):
        code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / name, *common, *flags)
        assert code == 0, stderr
        assert "capturable" not in stderr  # torch's warning about eager capturable steps: expected here, kept quiet
        runs[name] = (metrics(tmp_path / name), summary(tmp_path / name))
    assert 3 <= runs["graphed"][1]["cuda_graph_first_replayed_step"] <= 7
    assert runs["eager"][1]["cuda_graph_first_replayed_step"] is None
    losses = {name: torch.tensor([r["loss"] for r in rows]) for name, (rows, _) in runs.items()}
    torch.testing.assert_close(losses["graphed"], losses["eager"], rtol=2e-2, atol=2e-2)
    assert [r["lr"] for r in runs["graphed"][0]] == pytest.approx([r["lr"] for r in runs["eager"][0]], rel=1e-6)
    assert losses["graphed"][-1] < losses["graphed"][0]
    with open(tmp_path / "graphed" / "summary.json") as f:
        assert json.load(f)["steps"] == 10
