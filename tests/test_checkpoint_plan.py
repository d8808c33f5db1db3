"""checkpoint_layers from a measured probe step (moetune/checkpoint_plan.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from moetune import FastMoEModel
from moetune.checkpoint_plan import choose_plan

from .models.helpers import checkpoint  # noqa: F401  (session fixture)
from .models.tiny import VOCAB

GiB = 2**30

pytestmark = pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")


def test_choice_from_the_probe():
    # 8 layers, 0.5 GiB each; every layer checkpointed is estimated at 13 GiB with the optimizer state.
    def choose(budget, attention=0):
        return choose_plan(8, GiB // 2, 13 * GiB, budget, attention)

    assert choose(80 * GiB) == (0, 0)  # plenty: nothing recomputed
    assert choose(15 * GiB) == (4, 0)  # 2 GiB spare: four layers left out
    assert choose(14 * GiB) == (6, 0)
    assert choose(13 * GiB) == (7, 0)  # nothing spare: all checkpointed but the last, which saves nothing
    assert choose(12 * GiB, GiB // 8) == (8, 0)  # over budget already
    assert choose_plan(8, 0, 13 * GiB, 80 * GiB) == (8, 0)  # a measurement of nothing: all checkpointed
    # Kept attention (1/8 GiB a layer) first: 0.5 GiB spare keeps it in four checkpointed layers.
    assert choose(13 * GiB + GiB // 2, GiB // 8) == (7, 4)
    assert choose(14 * GiB, GiB // 8) == (7, 7)  # all seven keep it (room for eight)
    # 2 GiB spare: 1 GiB for all eight, then each layer left out costs 3/8 GiB more: two of them.
    assert choose(15 * GiB, GiB // 8) == (6, 6)
    assert choose(15 * GiB + GiB // 2, GiB // 8) == (4, 4)  # 1.5 GiB after the kept outputs: four out
    assert choose(80 * GiB, GiB // 8) == (0, 0)
    assert choose_plan(1, GiB, 10 * GiB, 10 * GiB) == (0, 0)  # one layer, the last: left out for free
    assert choose_plan(1, GiB, 10 * GiB, 9 * GiB) == (1, 0)  # over budget already: the floor


class FakeMemory:
    """Allocator figures for a CPU run of the probe: each read of `allocated` is 1000 bytes more. The first probe
    peaks at `peak`; the probes that check a plan at `checks` in turn (the last repeated; None: out of memory)."""

    def __init__(self, peak=10_000, available=100_000, fail=False, checks=(0,)):
        self.reads, self.peak_bytes, self.available_bytes, self.fail = 0, peak, available, fail
        self.peaks, self.checks = [peak, *checks], 0

    def allocated(self):
        self.reads += 1
        return 1000 * self.reads

    def start(self):
        pass

    def peak(self):
        if self.fail:
            raise torch.OutOfMemoryError("fake: out of memory")
        peak = self.peaks[min(self.checks, len(self.peaks) - 1)]
        self.checks += 1
        if peak is None:
            raise torch.OutOfMemoryError("fake: out of memory")
        return peak

    def available(self):
        return self.available_bytes

    def release(self):
        pass


def _flags(model):
    from moetune.fast_model import _decoder_layers

    return [layer.gradient_checkpointing for layer in _decoder_layers(model)]


def test_probe_measures_both_ends_and_plans(checkpoint):
    model = _model(checkpoint("mixtral"), "cpu")
    rng = torch.get_rng_state()
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=FakeMemory())
    assert torch.equal(torch.get_rng_state(), rng)  # the probe's random ids leave the caller's stream alone
    hidden = 2 * 9 * model.config.hidden_size * 4  # each probed layer: 1000 bytes kept + its fp32 input
    assert plan["activation_bytes_per_layer"] == 1000 + hidden and plan["probe_peak_bytes"] == 10_000
    assert plan["checkpoint_layers"] == 0 and _flags(model) == [False, False] and "why" not in plan
    assert all(p.grad is None for p in model.parameters())
    # Planned again with no memory to spare (budget 0.9 x 10_000 below the probe's peak): all checkpointed.
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=FakeMemory(available=10_000))
    assert plan["checkpoint_layers"] == 2 and _flags(model) == [True, True]
    # Plenty on the device, but a cap below the probe's peak (a smaller card to plan for): all checkpointed.
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, max_memory_gib=9_000 / GiB, memory=FakeMemory())
    assert plan["budget_bytes"] == 9_000 and plan["checkpoint_layers"] == 2 and _flags(model) == [True, True]
    assert "even with every layer checkpointed the step is estimated at" in plan["why"]  # said, not silent
    # The estimate for every layer checkpointed: the probe's peak less what its two layers kept, plus the state.
    least = plan["probe_peak_bytes"] - 2 * plan["activation_bytes_per_layer"] + plan["optimizer_state_bytes"]
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, max_memory_gib=(least - 1) / GiB, memory=FakeMemory())
    assert plan["checkpoint_layers"] == 2 and "why" in plan, plan
    # Exactly at the budget: the last layer left out (free at the peak), checked by a probe with the plan.
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, max_memory_gib=least / GiB, memory=FakeMemory())
    assert plan["checkpoint_layers"] == 1 and "why" not in plan and plan["checks"] == [((1, 0), plan["verified_peak_bytes"])]
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, max_memory_gib=1.0, memory=FakeMemory())
    assert plan["budget_bytes"] == 90_000 and plan["checkpoint_layers"] == 0  # the device's 90% is the smaller


def test_a_plan_for_the_step_in_backward_holds_gradients_as_its_chunks_do(checkpoint, monkeypatch):
    from moetune import checkpoint_plan
    from moetune.training import step_in_backward
    from moetune.training.step_in_backward import StepInBackward

    model = _model(checkpoint("mixtral"), "cpu")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    chunk_bytes = 3 * max(p.nbytes for p in params)  # several chunks in this tiny model, each over a layer's part
    monkeypatch.setattr(checkpoint_plan, "StepInBackward", functools.partial(StepInBackward, chunk_bytes=chunk_bytes))

    def held_at_each_arrival(run) -> list[frozenset]:
        """The gradients alive as each one arrives (hooks registered before the optimizer's or the probe's)."""
        seen = []
        hooks = [p.register_post_accumulate_grad_hook(
            lambda p: seen.append(frozenset(n for n, q in named if q.grad is not None))) for p in params]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    class Keep(torch.optim.Optimizer):  # steps nothing: StepInBackward's holding alone
        def __init__(self, params, **kwargs):
            super().__init__(params, {})

        def step(self, closure=None):
            pass

    ids = torch.randint(0, VOCAB, (2, 9))

    def real_step():
        optimizer = StepInBackward(params, Keep, chunk_bytes=chunk_bytes)
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        finally:
            optimizer.remove_hooks()

    def probe():  # (it draws its own ids: the order of the arrivals does not depend on them)
        assert checkpoint_plan._probe_step(model, FakeMemory(), torch.device("cpu"), 2, 9, in_chunks=True) == 10_000

    expected = held_at_each_arrival(real_step)
    got = held_at_each_arrival(probe)
    assert got == expected and len(got) == len(params)
    # More than one chunk holds some of its gradients at once: why one chunk's bytes was not enough.
    chunk_of = {named[i][0]: c for c, indices in enumerate(step_in_backward.chunk_indices(params, chunk_bytes))
                for i in indices}
    assert max(len({chunk_of[n] for n in alive}) for alive in got) >= 2
    assert all(p.grad is None for p in params) and all(not p._post_accumulate_grad_hooks for p in params)

    class Watching(FakeMemory):  # how many gradients are alive when the probe's backward has ended
        def peak(self):
            self.live = sum(p.grad is not None for p in params)
            return super().peak()

    monkeypatch.undo()  # the default chunks (one here: every chunk complete by the end of backward)
    plans = {}
    for flag in (False, True):
        memory = Watching()
        plans[flag] = FastMoEModel.fit_checkpoint_layers(model, 2, 9, step_in_backward=flag, memory=memory)
        assert memory.live == (0 if flag else len(params))  # the flag reaches the probe
    assert plans[True]["optimizer_state_bytes"] == plans[False]["optimizer_state_bytes"]  # the probe measures it
    with pytest.raises(ValueError, match="step_in_backward: expected True or False"):
        FastMoEModel.fit_checkpoint_layers(model, 2, 9, step_in_backward=1, memory=FakeMemory())


def _four_moe_layers(directory):
    """(config, model, its decoder layers): a tiny Qwen3-MoE of four MoE layers, saved and loaded for LoRA."""
    import transformers

    from moetune.fast_model import _decoder_layers

    from .models.tiny import tiny_config

    config = tiny_config("qwen3_moe")
    config.num_hidden_layers, config.mlp_only_layers = 4, []
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(directory)
    model = _model(str(directory), "cpu")
    return config, model, _decoder_layers(model)


def test_probe_measures_the_kept_attention_and_plans_it(tmp_path):
    from moetune.models import kept_attention

    config, model, layers = _four_moe_layers(tmp_path)
    output = 2 * config.num_attention_heads * 9 * config.head_dim * 4  # [batch, heads, length, head dim] fp32

    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=FakeMemory(available=2**30))
    attention = plan["attention_bytes_per_layer"]
    assert output < attention < 2 * output  # the output and its log-sum-exp
    assert plan["checkpoint_layers"] == 0 and plan["kept_attention_layers"] == 0  # plenty of room
    # Room for exactly three kept outputs over every layer checkpointed: all but the last checkpointed, three keep.
    least = (plan["probe_peak_bytes"] - 2 * plan["activation_bytes_per_layer"] - 2 * attention
             + plan["optimizer_state_bytes"])
    cap = (least + 3 * attention) / GiB
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, max_memory_gib=cap, memory=FakeMemory(available=2**30))
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"]) == (3, 3), plan
    assert _flags(model) == [True] * 3 + [False] and kept_attention.kept_attention_layers(layers) == 3
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, max_memory_gib=cap, keep_attention=False,
                                              memory=FakeMemory(available=2**30))
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], plan["attention_bytes_per_layer"]) == (3, 0, 0)
    assert kept_attention.kept_attention_layers(layers) == 0
    ids = torch.randint(0, VOCAB, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()  # trains as planned
    # A probe that runs out of memory leaves every layer checkpointed and none keeping attention.
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=FakeMemory(fail=True))
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"]) == (4, 0)
    assert _flags(model) == [True] * 4 and kept_attention.kept_attention_layers(layers) == 0


def test_a_plan_above_the_floor_is_checked_by_a_probe_with_itself(tmp_path):
    """The estimate assumes the step peaks where the probe did: a second probe with the plan checks it, and while
    it is over the budget, layers go back to checkpointing first, then kept attention goes."""
    from moetune.models import kept_attention

    _, model, layers = _four_moe_layers(tmp_path)

    def plan_with(checks, **kwargs):
        memory = FakeMemory(available=2**30, checks=checks)
        plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=memory, **kwargs)
        assert _flags(model) == [i < plan["checkpoint_layers"] for i in range(4)]
        assert kept_attention.kept_attention_layers(layers) == plan["kept_attention_layers"]
        return plan, memory.checks - 1  # probes after the first

    plan, checks = plan_with([0])
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], checks) == (0, 0, 1)  # checked, fits
    assert plan["verified_peak_bytes"] == plan["optimizer_state_bytes"]  # the check's peak (0) plus the state
    per_layer, attention, state = (plan[k] for k in ("activation_bytes_per_layer", "attention_bytes_per_layer",
                                                     "optimizer_state_bytes"))
    budget = plan["budget_bytes"]
    # Over by two layers' worth (each back in checkpointing frees its activations less the attention it keeps):
    # three go back, one as a margin for the next check.
    plan, checks = plan_with([budget - state + 2 * (per_layer - attention), 0])
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], checks) == (3, 3, 2)
    # Over by more than the layers left out free: all back but the last (checkpointing the last layer saves
    # nothing at the peak: its backward recomputes at once what it did not hold), then kept attention drops (two
    # outputs' worth and one more), checked each time.
    plan, checks = plan_with([budget - state + 4 * (per_layer - attention) + attention + 1,
                              budget - state + attention + 1, budget - state])
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], checks) == (3, 0, 3)
    assert plan["verified_peak_bytes"] == budget
    assert [peak for _, peak in plan["checks"]] == [budget + 4 * (per_layer - attention) + attention + 1,
                                                    budget + attention + 1, budget]  # each check reported
    assert [c[0] for c in plan["checks"]] == [(0, 0), (3, 3), (3, 0)]
    # Still over after three checks, or a check out of memory: every layer checkpointed, none keeping, unchecked.
    for failing, said in (([budget - state + 1], "peaked at"), ([None], "ran out of memory")):
        plan, _ = plan_with(failing)
        assert (plan["checkpoint_layers"], plan["kept_attention_layers"]) == (4, 0)
        assert plan["verified_peak_bytes"] is None and said in plan["why"]
    # Given back to the floor by a check (planned without kept attention, the last layer left out has nothing
    # else to give): the over-budget measurement was of the plan before, not reported.
    plan, checks = plan_with([budget - state + 4 * per_layer, budget - state + 1], keep_attention=False)
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], checks) == (4, 0, 2)  # layers, then the last
    assert plan["verified_peak_bytes"] is None and "why" not in plan
    assert [c[0] for c in plan["checks"]] == [(0, 0), (3, 0)]
    # Every layer checkpointed without kept attention (the floor) is not checked.
    plan, checks = plan_with([None], keep_attention=False, max_memory_gib=1e-6)
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], checks) == (4, 0, 0)
    # Planned without kept attention: layers given back by a failed check keep none either (the plan measured no
    # attention output to count), also from a plan with no layer checkpointed.
    plan, checks = plan_with([0], keep_attention=False)
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], plan["attention_bytes_per_layer"]) == (0, 0, 0)
    plan, checks = plan_with([budget - state + per_layer * 3 // 2, 0], keep_attention=False)
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"], checks) == (3, 0, 2)


def test_probe_out_of_memory_keeps_every_layer_checkpointed(checkpoint):
    model = _model(checkpoint("mixtral"), "cpu")
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=FakeMemory(fail=True))
    assert plan["checkpoint_layers"] == 2 and "ran out of memory" in plan["why"]
    assert _flags(model) == [True, True]


def test_a_real_step_over_the_budget_gives_back_as_a_failed_check(tmp_path):
    """refit_to_step: a training step's own peak over the plan's budget checkpoints more layers (all but the last),
    then keeps less attention, by the excess and one more; under the budget, or at the floor, nothing changes."""
    from moetune.checkpoint_plan import _apply, refit_to_step
    from moetune.models import kept_attention

    _, model, layers = _four_moe_layers(tmp_path)
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 9, memory=FakeMemory(available=2**30))
    attention = plan["attention_bytes_per_layer"]
    assert attention > 0 and plan["checkpoint_layers"] == 0  # plenty of room: nothing checkpointed
    # The plan a tighter budget would have made: two layers checkpointed, both keeping attention.
    plan.update(checkpoint_layers=2, kept_attention_layers=2, activation_bytes_per_layer=10 * attention,
                budget_bytes=10**6)
    assert _apply(layers, 2, 2) == 2
    assert refit_to_step(model, plan, 10**6) is False  # at the budget: kept
    # Over by less than a layer's saving (9 kept outputs): one layer back, and one more as the margin, but not the
    # last layer: checkpointing it saves nothing at the peak (its backward recomputes at once what it did not hold).
    assert refit_to_step(model, plan, 10**6 + attention) is True
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"]) == (3, 3), plan
    assert _flags(model) == [True, True, True, False] and kept_attention.kept_attention_layers(layers) == 3
    # Only the last layer left out (run 58b's case): kept attention goes, by the excess (two outputs) and one more.
    assert refit_to_step(model, plan, 10**6 + 2 * attention) is True
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"]) == (3, 0)
    assert kept_attention.kept_attention_layers(layers) == 0
    # Nothing else to give: every layer checkpointed, the floor.
    assert refit_to_step(model, plan, 10**6 + 5 * attention) is True
    assert (plan["checkpoint_layers"], plan["kept_attention_layers"]) == (4, 0)
    assert _flags(model) == [True] * 4
    assert refit_to_step(model, plan, 2 * 10**6) is False  # the floor: nothing left to give back
    assert [peak for _, peak in plan["step_checks"]] == [10**6, 10**6 + attention, 10**6 + 2 * attention,
                                                        10**6 + 5 * attention, 2 * 10**6]
    assert plan["step_checks"][1][0] == (2, 2)  # each check records the plan it measured
    for bad, match in ((-1, "peak_bytes: expected an integer >= 0"), (1.5, "peak_bytes: expected an integer")):
        with pytest.raises(ValueError, match=match):
            refit_to_step(model, plan, bad)
    with pytest.raises(ValueError, match="plan: expected fit_checkpoint_layers' result for a measured plan"):
        refit_to_step(model, {"checkpoint_layers": None, "layers": 4}, 1)
    with pytest.raises(ValueError, match="plan: made for 5 decoder layers, the model has 4"):
        refit_to_step(model, dict(plan, layers=5), 1)


def test_step_checks_skip_steps_that_tuned_and_stop_after_their_count(tmp_path, monkeypatch):
    from moetune.checkpoint_plan import StepChecks, _apply
    from moetune.kernels import autotune

    _, model, layers = _four_moe_layers(tmp_path)
    plan = {"checkpoint_layers": 0, "kept_attention_layers": 0, "layers": 4, "activation_bytes_per_layer": 1000,
            "attention_bytes_per_layer": 0, "budget_bytes": 10_000}
    _apply(layers, 0, 0)

    class Peaks:  # the allocator's peak since the last reset, as the test sets it
        def __init__(self):
            self.peak, self.resets = 0, 0

        def reset_peak(self):
            self.peak, self.resets = 0, self.resets + 1

        def peak_so_far(self):
            return self.peak

    tuned = [0]
    monkeypatch.setattr(autotune, "tunings", lambda: tuned[0])
    memory = Peaks()
    checks = StepChecks(model, plan, "cpu", steps=2, memory=memory)
    assert memory.resets == 1  # from the loop's first step
    memory.peak, tuned[0] = 50_000, 1  # a step that tuned: its peak is the tuning's, not judged
    assert checks.after_step() is False and memory.resets == 2 and plan.get("step_checks") is None
    assert checks.earlier_peak_bytes == 50_000  # kept for the run's reported peak across the restart
    memory.peak = 10_500  # over by half a layer: one layer back, and one more
    assert checks.after_step() is True and plan["checkpoint_layers"] == 2 and _flags(model) == [True, True, False, False]
    assert memory.resets == 3 and checks.earlier_peak_bytes == 50_000
    memory.peak = 9_000
    assert checks.after_step() is False and checks.left == 0
    memory.peak = 99_000  # past the checked steps: nothing more
    assert checks.after_step() is False and plan["checkpoint_layers"] == 2 and len(plan["step_checks"]) == 2
    # Nothing to check: no measured plan, or no CUDA memory to read.
    for no_plan in (None, {"checkpoint_layers": None, "layers": 4, "why": "no memory plan on cpu"}):
        assert StepChecks(model, no_plan, "cpu", memory=Peaks()).after_step() is False
    assert StepChecks(model, plan, "cpu").after_step() is False


def _model(model_dir, device):
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32, device_map=device)
    return FastMoEModel.get_peft_model(model, r=4, lora_alpha=8)


def test_bad_arguments_and_cpu(checkpoint):
    model = _model(checkpoint("qwen3_moe"), "cpu")
    for kwargs, match in (
        (dict(batch_size=0, seq_len=8), "batch_size: expected an integer >= 1"),
        (dict(batch_size=1, seq_len=8, memory_fraction=1.5), r"memory_fraction: expected a number in \(0, 1\]"),
        (dict(batch_size=1, seq_len=8, optimizer="sgd"), "optimizer: expected one of adamw, adamw_bf16, adamw_8bit"),
        (dict(batch_size=1, seq_len=8, optimizer=["adamw"]), "optimizer: expected one of adamw, adamw_bf16, adamw_8bit"),
        (dict(batch_size=1, seq_len=8, max_memory_gib=0), "max_memory_gib: expected None or a number of GiB > 0"),
        (dict(batch_size=1, seq_len=8, max_memory_gib=float("inf")), "max_memory_gib: expected None or a number"),
        (dict(batch_size=1, seq_len=8, keep_attention="yes"), "keep_attention: expected True or False"),
    ):
        with pytest.raises(ValueError, match=match):
            FastMoEModel.fit_checkpoint_layers(model, **kwargs)
    plan = FastMoEModel.fit_checkpoint_layers(model, 1, 8)
    assert plan["checkpoint_layers"] is None and "cpu" in plan["why"]
    no_ckpt, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    no_ckpt = FastMoEModel.get_peft_model(no_ckpt, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with pytest.raises(ValueError, match="model: expected gradient checkpointing enabled"):
        FastMoEModel.fit_checkpoint_layers(no_ckpt, 1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_on_the_gpu(checkpoint):
    from moetune.fast_model import _decoder_layers

    model = _model(checkpoint("qwen3_moe"), "cuda")
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 64)
    assert plan["checkpoint_layers"] == 0  # a tiny model fits many times over
    assert plan["activation_bytes_per_layer"] > 0 and plan["probe_peak_bytes"] > 0
    assert not any(layer.gradient_checkpointing for layer in _decoder_layers(model))
    # A budget below the probe's own peak keeps every layer checkpointed.
    tiny = plan["probe_peak_bytes"] / torch.cuda.get_device_properties(0).total_memory / 2
    plan = FastMoEModel.fit_checkpoint_layers(model, 2, 64, memory_fraction=tiny)
    assert plan["checkpoint_layers"] == plan["layers"]
    assert all(layer.gradient_checkpointing for layer in _decoder_layers(model))
    ids = torch.randint(0, VOCAB, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()  # still trains
