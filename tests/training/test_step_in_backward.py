"""StepInBackward: the optimizer step inside the backward pass computes what one optimizer over all the
parameters computes, frees each chunk's gradients as soon as it steps, and refuses what needs every gradient at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moetune.training.loop import make_optimizer
from moetune.training.step_in_backward import StepInBackward

WIDTH = 16
CHUNK = 2 * WIDTH * WIDTH * 4  # two [WIDTH, WIDTH] fp32 weights per chunk


def make_model(seed: int = 0, layers: int = 5, device="cpu") -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).to(device)


def batches(steps: int, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, WIDTH, generator=gen).to(device) for _ in range(steps)]


def train(model, optimizer, data, scheduler=None) -> list[torch.Tensor]:
    for x in data:
        model(x).square().mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_same_updates_as_one_optimizer_over_all_parameters():
    data = batches(4)
    reference = make_model()
    expected = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1), data)
    model = make_model()
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2, weight_decay=0.1)
    assert len(optimizer._chunks) > 2
    assert_same(train(model, optimizer, data), expected)
    assert expected[0].ne(make_model()[0].weight).any()  # it trained


def test_gradients_are_freed_as_their_chunk_steps():
    model = make_model()
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)
    params = list(model.parameters())
    live = []

    def count(_):
        live.append(sum(p.grad is not None for p in params))

    for p in params:  # registered after the optimizer's hooks: runs after any step those trigger
        p.register_post_accumulate_grad_hook(count)
    before = [p.detach().clone() for p in params]
    model(batches(1)[0]).square().mean().backward()
    largest_chunk = max(len(chunk) for _, _, chunk in optimizer._chunks)
    assert len(live) == len(params) and max(live) <= largest_chunk
    assert all(p.grad is None for p in params)
    assert all(p.ne(b).any() for p, b in zip(params, before))  # every chunk stepped within backward


def test_a_parameter_without_gradient_is_skipped_and_its_chunk_steps_at_step():
    data = batches(3)

    def run(make):
        model = make_model()
        optimizer = make(model.parameters())
        model[3].requires_grad_(False)  # frozen after the optimizer is built: never gets a gradient
        return train(model, optimizer, data)

    def step_in_backward(params):
        return StepInBackward(params, torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)

    expected = run(lambda params: torch.optim.AdamW(params, lr=1e-2))
    assert_same(run(step_in_backward), expected)


def test_frozen_parameters_are_left_out_and_never_stepped():
    model = make_model()
    model[0].requires_grad_(False)  # AdamW(model.parameters()) with frozen base weights: the usual idiom
    frozen = [p.detach().clone() for p in model[0].parameters()]
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)
    assert all(p not in optimizer._chunk_of for p in model[0].parameters())
    train(model, optimizer, batches(2))
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
    assert len(optimizer.state_dict()["state"]) == len(list(model.parameters())) - 2


def test_named_parameters_extra_group_keys_and_several_groups():
    data = batches(3)

    def groups(model, named):
        def params(layers):
            return list(layers.named_parameters()) if named else list(layers.parameters())

        return [{"params": params(model[:2]), "name": "early", "lr": 3e-2}, {"params": params(model[2:])}]

    reference = make_model()
    expected = train(reference, torch.optim.AdamW(groups(reference, False), lr=1e-2), data)
    model = make_model()
    optimizer = StepInBackward(groups(model, True), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)
    assert optimizer.param_groups[0]["name"] == "early" and optimizer._chunks[0][1].param_groups[0]["name"] == "early"
    assert_same(train(model, optimizer, data), expected)
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_schedulers_that_cycle_momentum_find_the_inner_defaults():
    data = batches(4)

    def run(optimizer_of):
        model = make_model()
        optimizer = optimizer_of(model.parameters())
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)  # cycles betas
        return train(model, optimizer, data, scheduler), optimizer

    expected, _ = run(lambda params: torch.optim.AdamW(params, lr=1e-2))
    got, optimizer = run(lambda params: StepInBackward(params, torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2))
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert_same(got, expected)


def test_chunks_hold_at_most_chunk_bytes_or_one_larger_parameter():
    from moetune.training.step_in_backward import chunk_indices

    model = make_model()
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)
    assert all(sum(p.numel() * 4 for p in chunk) <= CHUNK for _, _, chunk in optimizer._chunks)
    # The chunks are chunk_indices' (the memory planner holds gradients in the same chunks).
    params = list(model.parameters())
    assert [[id(p) for p in chunk] for _, _, chunk in optimizer._chunks] == \
        [[id(params[i]) for i in indices] for indices in chunk_indices(params, CHUNK)]
    small = StepInBackward(make_model().parameters(), torch.optim.AdamW, chunk_bytes=100, lr=1e-2)
    assert [len(chunk) for _, _, chunk in small._chunks] == [1] * 10  # each weight alone; each bias alone
    assert chunk_indices(params) == [list(range(10))]  # 64 MiB by default: one chunk here
    # A model split over GPUs: no chunk spans two devices (each device's gradients come on its own autograd thread)
    on = [torch.empty(4, device=device) for device in ("cpu", "cpu", "meta", "meta", "cpu")]
    assert chunk_indices(on) == [[0, 1], [2, 3], [4]]


def test_one_stepper_per_parameter_and_a_discarded_one_lets_go():
    model = make_model()
    first = StepInBackward(model.parameters(), torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match="params: a parameter is already stepped in backward by another"):
        StepInBackward(model.parameters(), torch.optim.AdamW, lr=1e-2)
    del first  # no scheduler or other reference: collected, its hooks do nothing from now on
    data = batches(2)
    reference = make_model()
    expected = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data)
    assert_same(train(model, StepInBackward(model.parameters(), torch.optim.AdamW, lr=1e-2), data), expected)
    second = StepInBackward(make_model().parameters(), torch.optim.AdamW, lr=1e-2)
    second.remove_hooks()
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        import copy

        copy.deepcopy(second)


def test_zero_grad_ends_a_step_whose_backward_failed_midway():
    model = make_model()
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)

    def fail(grad):  # the gradient reaching the first layer's output: the last chunks never arrive
        raise RuntimeError("simulated failure")

    x = batches(1)[0]
    hidden = model[0](x)
    hidden.register_hook(fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        model[1:](hidden).sum().backward()
    assert optimizer._stepped  # the later layers' chunks stepped before the failure
    optimizer.zero_grad()
    model(x).sum().backward()  # the next step runs
    optimizer.step()


def test_a_second_backward_before_step_raises():
    model = make_model()
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)
    x = batches(1)[0]
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="no gradient accumulation"):
        model(x).sum().backward()
    optimizer.step()  # a step ends it: the next backward is the next step
    model(x).sum().backward()


def test_a_scheduler_sets_the_learning_rate_of_every_chunk():
    data = batches(4)

    def run(optimizer_of):
        model = make_model()
        optimizer = optimizer_of(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
        return train(model, optimizer, data, scheduler), optimizer

    expected, _ = run(lambda params: torch.optim.AdamW(params, lr=1e-2))
    got, optimizer = run(lambda params: StepInBackward(params, torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2))
    assert_same(got, expected)
    assert all(inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 4) for _, inner, _ in optimizer._chunks)


@pytest.mark.parametrize("saved_by", ["plain", "in_backward"])
def test_state_dicts_load_across_the_two_ways_of_stepping(saved_by):
    data = batches(5)
    reference = make_model()
    expected = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data)

    def plain(params):
        return torch.optim.AdamW(params, lr=1e-2)

    def in_backward(params):
        return StepInBackward(params, torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2)

    first, second = (plain, in_backward) if saved_by == "plain" else (in_backward, plain)
    model = make_model()
    optimizer = first(model.parameters())
    train(model, optimizer, data[:2])
    state = optimizer.state_dict()
    assert set(state["state"]) == set(range(len(list(model.parameters()))))
    resumed = second(model.parameters())
    resumed.load_state_dict(state)
    if isinstance(optimizer, StepInBackward):
        optimizer.remove_hooks()  # the first optimizer lets go of the parameters
    assert_same(train(model, resumed, data[2:]), expected)


def test_a_state_dict_of_other_parameter_groups_is_refused():
    model = make_model()
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, lr=1e-2)
    other = torch.optim.AdamW(list(model.parameters())[:3], lr=1e-2)
    with pytest.raises(ValueError, match="state_dict: its parameter groups"):
        optimizer.load_state_dict(other.state_dict())


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1.5, True])
def test_bad_chunk_bytes(chunk_bytes):
    with pytest.raises(ValueError, match="chunk_bytes: expected an integer >= 1"):
        StepInBackward(make_model().parameters(), torch.optim.AdamW, chunk_bytes=chunk_bytes, lr=1e-2)


def test_make_optimizer_steps_in_backward_when_asked():
    params = list(make_model().parameters())
    config = SimpleNamespace(optim="adamw", lr=1e-3, weight_decay=0.01, step_in_backward=True)
    optimizer = make_optimizer(params, config)
    assert isinstance(optimizer, StepInBackward)
    assert all(isinstance(inner, torch.optim.AdamW) for _, inner, _ in optimizer._chunks)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and "betas" in optimizer.param_groups[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda_steps_as_one_fused_optimizer():
    data = batches(3, "cuda")
    reference = make_model(device="cuda")
    expected = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01, fused=True), data)
    model = make_model(device="cuda")
    optimizer = StepInBackward(model.parameters(), torch.optim.AdamW, chunk_bytes=CHUNK, lr=1e-2, weight_decay=0.01,
                               fused=True)
    assert len(optimizer._chunks) > 2
    assert_same(train(model, optimizer, data), expected)
    config = SimpleNamespace(optim="adamw", lr=1e-2, weight_decay=0.01, step_in_backward=True)
    assert make_optimizer(make_model(device="cuda").parameters(), config).param_groups[0]["fused"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8bit_adamw_steps_in_backward_as_one_8bit_optimizer():
    bnb = pytest.importorskip("bitsandbytes")
    data = batches(3, "cuda")

    def big_model():  # wide enough for 8-bit states (bitsandbytes keeps tensors under 4096 elements in 32 bits)
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(4)]).to("cuda")

    def big_batches():
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(8, 128, generator=gen).to("cuda") for _ in range(len(data))]

    reference = big_model()
    expected = train(reference, bnb.optim.AdamW8bit(reference.parameters(), lr=1e-3), big_batches())
    model = big_model()
    optimizer = StepInBackward(model.parameters(), bnb.optim.AdamW8bit, chunk_bytes=2 * 128 * 128 * 4, lr=1e-3)
    assert len(optimizer._chunks) > 1
    assert_same(train(model, optimizer, big_batches()), expected)
    resumed = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    optimizer.remove_hooks()
    resumed.load_state_dict(optimizer.state_dict())  # the layout of one 8-bit optimizer


def test_a_chunks_last_gradients_from_two_threads_step_it_once(monkeypatch):
    """A model split over GPUs brings gradients on one autograd thread per GPU: two threads bringing a chunk's last
    gradients at once must step it once (the arrivals are counted under a lock)."""
    import threading
    import time

    weights = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    optimizer = StepInBackward(weights, torch.optim.SGD, lr=0.5)
    (_, inner, chunk), = optimizer._chunks
    assert len(chunk) == 2
    steps = []
    real_step = inner.step
    monkeypatch.setattr(inner, "step", lambda: steps.append(1) or real_step())

    class SlowSet(set):  # hands the GIL over between the arrival and the count, where the threads would collide
        def add(self, item):
            super().add(item)
            time.sleep(0.01)

    optimizer._arrived[0] = SlowSet()
    barrier = threading.Barrier(2)

    def arrive(p):
        p.grad = torch.ones(4)
        barrier.wait()
        optimizer._on_gradient(p)

    threads = [threading.Thread(target=arrive, args=(p,)) for p in weights]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert steps == [1]
    assert all(torch.equal(p.detach(), torch.full((4,), 0.5)) for p in weights)
