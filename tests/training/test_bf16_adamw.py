"""AdamWBf16: torch's AdamW update with bf16 moments rounded stochastically, one launch per group.

Both paths are checked against torch.optim.AdamW: the Triton kernel (through the interpreter on CPU, `triton`
parameter; on the GPU when there is one) and the torch path that runs on CPU without it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moetune.training import bf16_adamw
from moetune.training.bf16_adamw import AdamWBf16, round_bf16_stochastic

WAYS = ["torch", "triton"]


@pytest.fixture(params=WAYS)
def device(request, monkeypatch):
    """The device and path under test: torch on CPU, or the kernel (the GPU if there is one, else the interpreter,
    which needs triton >= 3.9)."""
    if request.param == "torch":
        monkeypatch.setattr(bf16_adamw, "_use_triton", lambda device: False)
        return "cpu"
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    from moetune.experts.backends.triton import probe

    reason = probe("cpu", None, torch.float32)  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU
    if reason is not None:
        pytest.skip(reason)
    return "cpu"


@pytest.fixture
def way(request, device):
    """Which path the device fixture set up: "torch" or "triton"."""
    return request.node.callspec.params["device"]


def params_and_reference(device, shapes=((37, 5), (3000,), (1,))):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(*shape, generator=gen).to(device).requires_grad_() for shape in shapes]
    return params, [p.detach().clone().requires_grad_() for p in params]


def set_grads(params, reference, gen):
    for p, r in zip(params, reference):
        g = torch.randn(p.shape, generator=gen).to(p.device)
        p.grad, r.grad = g.clone(), g.clone()


def test_first_step_is_torchs_and_the_moments_are_its_rounded(device, way):
    params, reference = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    set_grads(params, reference, torch.Generator().manual_seed(1))
    optimizer.step()
    torch_adamw.step()
    assert optimizer._layouts[0, params[0].device].use_triton == (way == "triton")
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)  # the update reads the fp32 moments
        state, expected = optimizer.state[p], torch_adamw.state[r]
        assert state["step"].item() == 1 and state["exp_avg"].dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):  # rounded up or down: within one bf16 ulp of the fp32 value
            ulp = torch.finfo(torch.bfloat16).eps * expected[key].abs()
            assert ((state[key].float() - expected[key]).abs() <= ulp * 1.001).all()


def test_many_steps_follow_torchs_adamw(device):
    """200 steps of a noisy least-squares fit: the bf16 moments' rounding noise stays small next to the updates."""
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(64, 16, generator=gen).to(device)
    inputs = torch.randn(256, 64, generator=gen).to(device)
    start = torch.zeros(64, 16).to(device)
    losses = {}
    for name in ("bf16", "torch"):
        w = start.clone().requires_grad_()
        optimizer = AdamWBf16([w], lr=2e-2, weight_decay=0.01) if name == "bf16" else \
            torch.optim.AdamW([w], lr=2e-2, weight_decay=0.01)
        noise = torch.Generator().manual_seed(3)
        trace = []
        for _ in range(200):
            batch = inputs + 0.1 * torch.randn(inputs.shape, generator=noise).to(device)
            loss = ((batch @ w - batch @ target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(loss.item())
        losses[name] = torch.tensor(trace)
    assert losses["bf16"][-1] < 0.05 * losses["bf16"][0]  # it trains
    assert ((losses["bf16"] - losses["torch"]).abs() / losses["torch"]).max() < 0.02  # measured 0.3-0.6%


def test_stochastic_rounding_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    for x in (1.0 + 2**-10, -3.3e-5):  # a quarter and some way between two bf16 neighbours
        rounded = round_bf16_stochastic(torch.full((100_000,), x), gen).float()
        low, high = rounded.min().item(), rounded.max().item()
        assert len(rounded.unique()) == 2 and low < x < high  # only the two neighbours
        sigma = (high - low) / 2 / 100_000**0.5  # at most, for one of two values
        assert abs(rounded.mean().item() - x) < 5 * sigma


def test_kernel_rounding_is_unbiased(device, way):
    """The kernel's own rounding: v = (1 - beta2) * g^2 from zero state lands between two bf16 values; over many
    elements its mean is the fp32 value."""
    if way == "torch":
        pytest.skip("the torch path is covered by test_stochastic_rounding_is_unbiased")
    n = 50_000
    p = torch.zeros(n, device=device, requires_grad=True)
    optimizer = AdamWBf16([p], lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.full((n,), 1.3, device=device)
    optimizer.step()
    v = optimizer.state[p]["exp_avg_sq"].float()
    exact = torch.tensor(0.001 * 1.3 * 1.3)
    assert len(v.unique()) == 2
    torch.testing.assert_close(v.mean().cpu(), exact, rtol=3e-4, atol=0)


def test_parameters_without_a_gradient_are_left_alone(device):
    params, reference = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2)
    set_grads(params, reference, torch.Generator().manual_seed(4))
    params[1].grad = None
    before = params[1].detach().clone()
    optimizer.step()
    assert torch.equal(params[1].detach(), before)
    assert [optimizer.state[p]["step"].item() for p in params] == [1, 0, 1]
    assert not (params[0].detach() == reference[0].detach()).all()


def test_a_parameter_moved_after_the_first_step_is_stepped_where_it_is(device):
    params, reference = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2, weight_decay=0.0)
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    set_grads(params, reference, gen)
    optimizer.step()
    torch_adamw.step()
    params[0].data = params[0].data.clone()  # new storage (what model.to() does)
    set_grads(params, reference, gen)
    optimizer.step()
    torch_adamw.step()
    torch.testing.assert_close(params[0], reference[0], rtol=0, atol=1e-3)


def test_the_gradients_address_table_is_reused_only_while_their_addresses_repeat(device, way, monkeypatch):
    """The kernel reads gradients through a device table of addresses: made again when a gradient lives somewhere
    else (a new tensor, a gradient dropped), reused when every address repeats (the usual step)."""
    if way != "triton":
        pytest.skip("the table is the kernel's")
    made = []
    real = bf16_adamw._to_device
    monkeypatch.setattr(bf16_adamw, "_to_device", lambda values, *args: made.append(list(values)) or real(values, *args))
    params, reference = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2, weight_decay=0.0)
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(6)
    grads = [torch.empty_like(p) for p in params]  # fixed storage: the same addresses every step
    held = []
    for step in range(5):
        set_grads(params, reference, gen)
        if step in (0, 1, 2):
            for p, g in zip(params, grads):
                p.grad = g.copy_(p.grad)
        elif step == 3:
            held = [p.grad for p in params]  # new tensors, the old storage still alive: other addresses
        else:
            params[2].grad = None  # a gradient dropped: address 0
            reference[2].grad = None
        made.clear()
        optimizer.step()
        torch_adamw.step()
        tables = [values for values in made if len(values) == len(params)]
        if step in (1, 2):
            assert tables == []  # the same addresses as the step before: nothing built
        else:
            assert [0 if p.grad is None else p.grad.data_ptr() for p in params] in tables
        for p, r in zip(params, reference):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-3)
    assert held


def test_state_dict_round_trip_and_torchs_state_dict_loads(device):
    params, reference = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2)
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        set_grads(params, reference, gen)
        optimizer.step()
        torch_adamw.step()
    saved = optimizer.state_dict()
    again = AdamWBf16([p.detach().clone().requires_grad_() for p in params], lr=1.0)
    again.load_state_dict(saved)
    assert again.param_groups[0]["lr"] == 1e-2
    for p, q in zip(params, again.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert again.state[q][key].dtype == torch.bfloat16 and torch.equal(again.state[q][key], optimizer.state[p][key])
        assert again.state[q]["step"].item() == 3
    from_torch = AdamWBf16([r.detach().clone().requires_grad_() for r in reference], lr=1e-2)
    from_torch.load_state_dict(torch_adamw.state_dict())
    for q, r in zip(from_torch.param_groups[0]["params"], reference):
        assert torch.equal(from_torch.state[q]["exp_avg"], torch_adamw.state[r]["exp_avg"].to(torch.bfloat16))
    set_grads(again.param_groups[0]["params"], from_torch.param_groups[0]["params"], gen)
    again.step()  # steps on from the loaded state (the flat buffers were rebuilt around it)
    from_torch.step()
    assert all(again.state[q]["step"].item() == 4 for q in again.param_groups[0]["params"])


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="params: AdamWBf16 expects float32 parameters"):
        AdamWBf16([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)])
    with pytest.raises(ValueError, match="params: AdamWBf16 expects contiguous parameters"):
        AdamWBf16([torch.zeros(3, 4).t().requires_grad_()])
    with pytest.raises(ValueError, match="lr: expected >= 0"):
        AdamWBf16([torch.zeros(3, requires_grad=True)], lr=-1.0)
    with pytest.raises(ValueError, match="betas: expected two values in"):
        AdamWBf16([torch.zeros(3, requires_grad=True)], betas=(0.9, 1.0))


def test_stepped_in_backward_and_by_moetune_train(device):
    """`--optim adamw_bf16 --step-in-backward`: each chunk an AdamWBf16 (one launch on CUDA), updates within the
    rounding noise of torch's AdamW over all the parameters."""
    from types import SimpleNamespace

    from moetune.training.loop import make_optimizer
    from moetune.training.step_in_backward import StepInBackward

    params, reference = params_and_reference(device)
    config = SimpleNamespace(optim="adamw_bf16", lr=1e-2, weight_decay=0.01, step_in_backward=True)
    optimizer = make_optimizer(params, config)
    assert isinstance(optimizer, StepInBackward) and optimizer._optimizer_class is AdamWBf16
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        weights = [torch.randn(p.shape, generator=gen).to(device) for p in params]
        sum((w * p).sum() for w, p in zip(weights, params)).backward()  # each chunk steps as its gradients arrive
        sum((w * r).sum() for w, r in zip(weights, reference)).backward()
        optimizer.step()
        torch_adamw.step()
        optimizer.zero_grad()
        torch_adamw.zero_grad()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=0, atol=2e-3)  # 5 steps of lr 1e-2
    state = optimizer.state_dict()["state"]
    assert set(state) == {0, 1, 2} and state[0]["exp_avg"].dtype == torch.bfloat16


def test_a_resumed_run_rounds_as_the_uninterrupted_one(device, monkeypatch):
    """The rounding noise is keyed by each parameter's saved seed and its step: resuming from a state_dict gives
    bitwise the uninterrupted run's parameters and moments. (Two runs in one process: each starts the seed count
    afresh, as each process of a real run and its resumption does.)"""
    import io
    import itertools

    gen = torch.Generator().manual_seed(8)
    start, _ = params_and_reference(device)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in start] for _ in range(6)]

    def run(params, optimizer, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()

    whole = [p.detach().clone().requires_grad_() for p in start]
    whole_optimizer = AdamWBf16(whole, lr=1e-2)
    monkeypatch.setattr(bf16_adamw, "_seeds", itertools.count())
    run(whole, whole_optimizer, grads)
    monkeypatch.setattr(bf16_adamw, "_seeds", itertools.count())
    first = [p.detach().clone().requires_grad_() for p in start]
    first_optimizer = AdamWBf16(first, lr=1e-2)
    run(first, first_optimizer, grads[:3])
    buffer = io.BytesIO()
    torch.save(first_optimizer.state_dict(), buffer)
    monkeypatch.setattr(bf16_adamw, "_seeds", itertools.count(100))  # the resumed process draws none
    resumed = [p.detach().clone().requires_grad_() for p in first]
    resumed_optimizer = AdamWBf16(resumed, lr=1e-2)
    resumed_optimizer.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    run(resumed, resumed_optimizer, grads[3:])
    for p, q in zip(whole, resumed):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "seed"):
            assert torch.equal(torch.as_tensor(whole_optimizer.state[p][key]),
                               torch.as_tensor(resumed_optimizer.state[q][key]))


def test_two_optimizers_round_with_their_own_noise(device):
    """Two chunks of the step in backward (two optimizers) never share their rounding noise."""
    params, _ = params_and_reference(device, shapes=((4096,),))
    twin = [params[0].detach().clone().requires_grad_()]
    optimizers = [AdamWBf16(params, lr=1e-2), AdamWBf16(twin, lr=1e-2)]
    grad = torch.randn(4096, generator=torch.Generator().manual_seed(9)).to(device)
    for p, optimizer in ((params[0], optimizers[0]), (twin[0], optimizers[1])):
        p.grad = grad.clone()
        optimizer.step()
    first, second = (o.state[p]["exp_avg_sq"] for o, p in zip(optimizers, (params[0], twin[0])))
    assert not torch.equal(first, second)


def test_a_parameter_changed_after_the_first_step_is_refused(device):
    params, _ = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    params[0].data = params[0].data.double()
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(ValueError, match="params: a parameter changed shape, dtype or layout"):
        optimizer.step()


def test_a_refused_group_is_not_kept_and_a_cleared_state_starts_over(device):
    params, _ = params_and_reference(device)
    optimizer = AdamWBf16(params[:2], lr=1e-2)
    with pytest.raises(ValueError, match="params: AdamWBf16 expects float32 parameters"):
        optimizer.add_param_group({"params": [params[2].detach().to(torch.bfloat16).requires_grad_()]})
    assert len(optimizer.param_groups) == 1
    for p in params[:2]:
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.state.clear()
    optimizer.step()
    assert all(optimizer.state[p]["step"].item() == 1 for p in params[:2])
    torch_adamw = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], amsgrad=True)
    with pytest.raises(ValueError, match="state_dict: AdamWBf16 has no amsgrad"):
        AdamWBf16([torch.zeros(3, requires_grad=True)]).load_state_dict(torch_adamw.state_dict())


def test_step_in_backward_state_dict_round_trip(device):
    """StepInBackward over AdamWBf16 chunks: its state_dict (one optimizer's layout) loads into a new one, moments,
    steps and seeds included, and the next steps of both agree bitwise."""
    from moetune.training.step_in_backward import StepInBackward

    def make(params):
        return StepInBackward(params, AdamWBf16, chunk_bytes=4096 * 4, lr=1e-2)  # several chunks

    params, _ = params_and_reference(device, shapes=((4096,), (37, 5), (4096,), (3,)))
    optimizer = make(params)
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        sum((torch.randn(p.shape, generator=gen).to(device) * p).sum() for p in params).backward()
        optimizer.step()
    copies = [p.detach().clone().requires_grad_() for p in params]
    again = make(copies)
    again.load_state_dict(optimizer.state_dict())
    weights = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    for ps, opt in ((params, optimizer), (copies, again)):
        sum((w * p).sum() for w, p in zip(weights, ps)).backward()
        opt.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    saved, loaded = optimizer.state_dict()["state"], again.state_dict()["state"]
    assert saved.keys() == loaded.keys() == {0, 1, 2, 3}
    assert all(saved[i]["seed"] == loaded[i]["seed"] and torch.equal(saved[i]["exp_avg_sq"], loaded[i]["exp_avg_sq"])
               for i in saved)


def test_a_group_over_two_devices_is_laid_out_per_device(device, monkeypatch):
    """A model split over GPUs by a device_map puts one group's parameters on several devices: each device's part
    gets its own flat moments (one launch on that device). Parts stood in for by a split of one device's group: the
    steps are torch's AdamW's, state_dict() has one optimizer's layout, and a part whose parameters all moved is
    dropped with its buffers."""
    from moetune.training.bf16_adamw import _by_device

    a, b, c = torch.zeros(2), torch.zeros(3, device="meta"), torch.zeros(4)
    parts = _by_device([a, b, c])
    assert list(parts) == [torch.device("cpu"), torch.device("meta")]
    assert [id(p) for p in parts[torch.device("cpu")]] == [id(a), id(c)] and parts[torch.device("meta")][0] is b

    params, reference = params_and_reference(device)
    split = {"gpu 0": [0, 2], "gpu 1": [1]}  # parameter indices of each stand-in device
    monkeypatch.setattr(bf16_adamw, "_by_device",
                        lambda group: {name: [group[i] for i in indices] for name, indices in split.items()})
    optimizer = AdamWBf16(params, lr=1e-2, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    set_grads(params, reference, torch.Generator().manual_seed(1))
    optimizer.step()
    torch_adamw.step()
    assert sorted(optimizer._layouts) == [(0, "gpu 0"), (0, "gpu 1")]
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    saved = optimizer.state_dict()
    assert sorted(saved["state"]) == [0, 1, 2] and saved["param_groups"][0]["params"] == [0, 1, 2]

    whole = AdamWBf16([p.detach().clone().requires_grad_() for p in params], lr=1e-2, weight_decay=0.1)
    whole.load_state_dict(saved)  # into one layout
    for i, p in enumerate(whole.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(whole.state[p][key], optimizer.state[params[i]][key])

    split.clear()
    split["gpu 1"] = [0, 1, 2]  # every parameter of "gpu 0" moved to "gpu 1"
    set_grads(params, reference, torch.Generator().manual_seed(2))
    optimizer.step()
    assert list(optimizer._layouts) == [(0, "gpu 1")]
    assert all(optimizer.state[p]["step"].item() == 2 for p in params)  # the moved state went along


def test_capturable_steps_as_the_host_counted_one(device, monkeypatch):
    """capturable=True keeps the step counts and bias corrections on the device and may read lr from a tensor: the
    same updates, bitwise, as the host-counted optimizer (both compute the corrections in float64; the two draw the
    same rounding seeds here)."""
    import itertools

    monkeypatch.setattr(bf16_adamw, "_new_seed", functools.partial(next, itertools.cycle([11, 22, 33])))
    params, _ = params_and_reference(device)
    twins = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2, device=device)
    graphable = AdamWBf16(params, lr=lr, weight_decay=0.1, capturable=True)
    host = AdamWBf16(twins, lr=float(lr), weight_decay=0.1)  # the float32 value the tensor holds
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        if step == 2:  # a schedule's change, in place, as torch's schedulers write a tensor learning rate
            lr.fill_(5e-3)
            host.param_groups[0]["lr"] = float(lr)
        set_grads(params, twins, gen)
        graphable.step()
        host.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert torch.equal(graphable.state[p]["exp_avg_sq"], host.state[q]["exp_avg_sq"])
        step = graphable.state[p]["step"]
        assert step.device == p.device and step.item() == 4 == host.state[q]["step"].item()
    # Into a host-counted optimizer (its counts back on the host) and from it into a capturable one (its own lr
    # tensor, given the saved value): each keeps its own setting, and both step on as the host-counted one.
    counted = AdamWBf16([p.detach().clone().requires_grad_() for p in params], lr=1.0, weight_decay=0.1)
    counted.load_state_dict(graphable.state_dict())
    assert counted.param_groups[0]["capturable"] is False and counted.param_groups[0]["lr"] == float(lr)
    rate = torch.tensor(1.0, device=device)
    graphed = AdamWBf16([p.detach().clone().requires_grad_() for p in params], lr=rate, weight_decay=0.1,
                        capturable=True)
    graphed.load_state_dict(host.state_dict())
    assert graphed.param_groups[0]["lr"] is rate and rate.item() == float(lr)
    set_grads(counted.param_groups[0]["params"], twins, gen)
    for p, q in zip(graphed.param_groups[0]["params"], twins):
        p.grad = q.grad.clone()
    counted.step()
    graphed.step()
    host.param_groups[0]["lr"] = float(lr)
    host.step()
    for optimizer in (counted, graphed):
        for p, q in zip(optimizer.param_groups[0]["params"], twins):
            assert torch.equal(p, q)
            assert optimizer.state[p]["step"].device == (torch.device("cpu") if optimizer is counted else p.device)
    assert all(s["step"].item() == 5 for s in graphed.state.values())


def test_capturable_refuses_a_parameter_without_a_gradient_and_a_bad_lr(device):
    params, _ = params_and_reference(device)
    optimizer = AdamWBf16(params, lr=1e-2, capturable=True)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(RuntimeError, match=r"capturable=True\): every parameter of a group steps together"):
        optimizer.step()
    with pytest.raises(ValueError, match="lr: expected a float or a one-element float32 tensor"):
        AdamWBf16(params, lr=torch.tensor([1e-2, 1e-3]))
    if device == "cpu":
        return
    counted = AdamWBf16(params, lr=torch.tensor(1e-2), capturable=True)  # on the host, for parameters on a GPU
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="lr: a tensor learning rate of a capturable AdamWBf16 lives on"):
        counted.step()
    counted.param_groups[0]["lr"] = torch.tensor(1e-2, device=device)
    counted.step()  # the refused step counted nothing
    assert all(s["step"].item() == 1 for s in counted.state.values())


def test_a_captured_step_of_a_host_counted_optimizer_is_refused(device, monkeypatch):
    """Under a capture (faked: the flag a real one sets), a group without capturable would record one step count
    for every replay: refused. The capturable step reads nothing on the host (no .item(), float() or bool of a
    tensor), which a capture could not."""
    params, _ = params_and_reference(device)
    host = AdamWBf16(params, lr=1e-2)
    graphed = AdamWBf16([p.detach().clone().requires_grad_() for p in params], lr=torch.tensor(1e-2, device=device),
                        capturable=True)
    for optimizer in (host, graphed):
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        optimizer.step()  # the first step lays out the state, eagerly
    monkeypatch.setattr(bf16_adamw, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="AdamWBf16: step\\(\\) is being captured as a CUDA graph, but capturable "
                                           "is off"):
        host.step()
    if not bf16_adamw._use_triton(torch.device(device)):
        return  # the torch path reads the corrections on the host: it runs where no capture can (CPU)
    reads = []
    for name in ("item", "__float__", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            reads.append(_name) or _real(self, *a, **k))
    graphed.step()
    assert reads == []
