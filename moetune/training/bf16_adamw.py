"""AdamW with its moments in bfloat16: 4 bytes of state per parameter instead of torch's 8, one launch per step.

    optimizer = AdamWBf16(model_lora_params, lr=1e-4, weight_decay=0.01)    # fp32 parameters (LoRA master weights)

The update is torch's AdamW (decoupled weight decay, bias corrections from each parameter's own step count); the
parameters stay fp32, the two moments are kept in bf16 and rounded stochastically (kernels/adamw.py says why), so
their expected values follow the fp32 recurrence. On CUDA one Triton launch steps a whole parameter group (the
kernel reads each parameter through a table of addresses, the gradients concatenated, the moments from one flat
buffer); on CPU the same math runs in torch, parameter by parameter.

What it buys: for the 643M LoRA parameters of a whole Qwen3-30B-A3B, 2.4 GiB less than torch's AdamW, which
`fit_checkpoint_layers` spends on kept attention or layers left out of checkpointing; with the step in backward
(training/step_in_backward.py) each chunk steps in one launch, where bitsandbytes' 8-bit AdamW launches per tensor
and stalled the GPU (NOTES run 50f).

State: state[p] holds "step" (a CPU float tensor, as torch's AdamW), "exp_avg" and "exp_avg_sq" (bf16 views into
the group's flat buffers) and "seed" (an int: the parameter's own rounding noise, keyed by it and the step, so a
resumed run rounds as the uninterrupted one did). state_dict() has torch's layout; load_state_dict() takes one
written by this class or by torch's AdamW (the moments then rounded to bf16 once, to nearest; amsgrad and maximize
are refused).

CUDA graphs (`capturable=True`): a captured step replays the launches as recorded, so nothing a step needs may be a
host number. Each parameter's step count then lives on the device (state[p]["step"] a view of the group's [P]
float32 counts), the bias corrections are computed there from it (in float64, as the host computes them), and lr may
be a one-element float32 tensor on the parameters' device, which the kernel reads (a scheduler fills it in place).
Every parameter of a group must have a gradient when it steps, and the first step, which lays out the state, runs
eagerly: capture after a warm-up step. Only lr is read at each replay; betas, eps and weight_decay are what they were
at the capture. A capture of a group without capturable=True is refused (its replays would repeat one step count),
and load_state_dict keeps the optimizer's own capturable and lr tensor (the saved lr is written into it). Without
capturable a tensor lr is read with float() at each group's step: a wait for the device.
"""

from __future__ import annotations

import itertools
import os

import torch

__all__ = ["AdamWBf16", "round_bf16_stochastic"]


class AdamWBf16(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, capturable: bool = False):
        if isinstance(lr, torch.Tensor) and (lr.numel() != 1 or lr.dtype != torch.float32):
            raise ValueError(f"lr: expected a float or a one-element float32 tensor, got a {lr.dtype} tensor of "
                             f"{lr.numel()} elements")
        if not lr >= 0.0:
            raise ValueError(f"lr: expected >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps: expected >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        # (group index, device) -> that part's flat moments and tables, made at its first step; a group spans
        # several devices where a device_map split the model over GPUs (each GPU's part is one launch there).
        self._layouts: dict[tuple[int, torch.device], _Layout] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      capturable=bool(capturable)))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                _check_param(p)
        except ValueError:
            del self.param_groups[-1]  # as if never added
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            parts = _by_device(group["params"])
            for key in [key for key in self._layouts if key[0] == index and key[1] not in parts]:
                del self._layouts[key]  # every parameter of that part moved to another device (laid out there)
            for device, params in parts.items():
                if not any(p.grad is not None for p in params):
                    continue
                layout = self._layouts.get((index, device))
                capturable, capturing = group.get("capturable", False), _capturing(params[0].device)
                if not capturable and capturing:
                    raise RuntimeError("AdamWBf16: step() is being captured as a CUDA graph, but capturable is off "
                                       "(its step counts are host numbers a replay repeats); make it with "
                                       "capturable=True")
                if layout is None or not layout.holds(params, self.state, capturable):
                    if capturing:  # the layout zeroes the moments: replays would zero them
                        raise RuntimeError("AdamWBf16: the first step of a group lays out its state and cannot be "
                                           "captured; take one step before capturing")
                    layout = self._layouts[index, device] = _Layout(params, self.state, capturable)
                self._step_group(group, layout)
        return loss

    def _step_group(self, group: dict, layout: _Layout) -> None:
        beta1, beta2 = group["betas"]
        layout.check()
        if any(p.grad is not None and p.grad.is_sparse for p in layout.params):
            raise RuntimeError("AdamWBf16 does not take sparse gradients")
        lr = group["lr"]
        if layout.steps is not None:  # capturable: counts, corrections and lr on the device
            if any(p.grad is None for p in layout.params):
                raise RuntimeError("AdamWBf16(capturable=True): every parameter of a group steps together, and one "
                                   "has no gradient this step")
            if isinstance(lr, torch.Tensor) and lr.device != layout.device:
                if lr.device.type != layout.device.type:
                    raise ValueError(f"lr: a tensor learning rate of a capturable AdamWBf16 lives on the "
                                     f"parameters' device ({layout.device}), got {lr.device}")
                lr = lr.to(layout.device, non_blocking=True)  # another GPU's part: a copy each step reads it
            layout.steps.add_(1.0)
            t = layout.steps.double()
            table = torch.stack((1.0 - torch.pow(beta1, t), 1.0 - torch.pow(beta2, t), t), dim=1)  # float64
        else:
            corrections = []
            for p in layout.params:
                if p.grad is None:
                    corrections += [0.0, 0.0, 0.0]
                    continue
                t = self.state[p]["step"].item() + 1
                corrections += [1.0 - beta1**t, 1.0 - beta2**t, t]
            lr = float(lr)
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if layout.use_triton:
            from ..kernels.adamw import adamw_step

            grads = [_flat_grad(p) for p in layout.params]  # held until the launch is queued
            grad_ptrs = layout.grad_ptrs(grads)
            if layout.steps is None:
                uniform = all(corrections[i:i + 3] == corrections[:3] for i in range(0, len(corrections), 3)) \
                    and corrections[0] != 0.0
                table = tuple(corrections[:3]) if uniform else _to_device(corrections, torch.float32, layout.device)
            else:
                table = table.float()  # what the host's float64 numbers become as the kernel's float32 arguments
            adamw_step(layout.param_ptrs(layout.params), grad_ptrs, layout.exp_avg, layout.exp_avg_sq, layout.block_segment,
                       layout.block_offset, layout.base, layout.numel, layout.seeds, table, **hyper)
        else:
            if layout.steps is not None:
                corrections, hyper["lr"] = table.flatten().tolist(), float(lr)
            _step_torch(layout, corrections, self.state, **hyper)
        if layout.steps is None:
            # Counted once the step is queued; one op for the group (the step in backward steps ~40 chunks a step).
            steps = [self.state[p]["step"] for p in layout.params if p.grad is not None]
            if steps:  # (step() calls this only for groups with a gradient)
                torch._foreach_add_(steps, 1.0)

    def load_state_dict(self, state_dict: dict) -> None:
        for group in state_dict["param_groups"]:
            for option in ("amsgrad", "maximize", "differentiable"):
                if group.get(option):
                    raise ValueError(f"state_dict: AdamWBf16 has no {option} (the saved optimizer had it on)")
        own = [(group.get("capturable", False), group["lr"]) for group in self.param_groups]
        super().load_state_dict(state_dict)  # the moments come back in the parameters' dtype (torch's policy)
        for group, (capturable, lr) in zip(self.param_groups, own):
            # A graph recorded this optimizer's lr tensor and needs its counts on the device: the saved group's
            # float lr and capturable (a host-counted or torch's checkpoint) would not reach its replays.
            group["capturable"] = capturable
            if isinstance(lr, torch.Tensor):
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        self._layouts.clear()
        for index, group in enumerate(self.param_groups):
            for device, params in _by_device(group["params"]).items():
                if any(p in self.state for p in params):
                    self._layouts[index, device] = _Layout(params, self.state, group.get("capturable", False))


def _by_device(params: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    """params grouped by device, each part in the group's order."""
    parts: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        parts.setdefault(p.device, []).append(p)
    return parts


def _check_param(p: torch.Tensor) -> None:
    if p.dtype != torch.float32:
        raise ValueError(f"params: AdamWBf16 expects float32 parameters (master weights), got {p.dtype}")
    if not p.is_contiguous():
        raise ValueError("params: AdamWBf16 expects contiguous parameters")


# Each parameter's rounding seed, drawn once when its state is made: from the process's torch seed and a count, so a
# run started with the same seed draws the same ones; kept in the state (a resumed run reads them back).
_seeds = itertools.count()


def _new_seed() -> int:
    return (torch.initial_seed() * 1000003 + next(_seeds) * 7919) % (2**31 - 1)


def _flat_grad(p: torch.Tensor) -> torch.Tensor | None:
    """p's gradient as the kernel reads it: fp32, contiguous (a copy only where it is not)."""
    if p.grad is None:
        return None
    return p.grad.to(torch.float32).contiguous()


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the GPU: torch's blocking copy from pageable memory
    synchronises the stream, which inside the backward pass (the step in backward) stalls the host at every chunk."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    if _capturing(device):
        # A CUDA graph would record the copy and read the pinned host buffer again at every replay, after it went
        # back to the pinned pool: the values are written by fill launches instead, recorded with them (a chunk's
        # ~15 addresses, a few us of a replay).
        out = torch.empty(len(values), dtype=dtype, device=device)
        for i, value in enumerate(values):
            out[i].fill_(value)
        return out
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _use_triton(device: torch.device) -> bool:
    """The kernel where Triton runs: CUDA, or the interpreter (tests); elsewhere the torch path."""
    from ..experts.backends.triton import probe

    return probe(device.type, device.index, torch.float32) is None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


class _Layout:
    """One group's flat bf16 moments (parameter i at base[i]) and the kernel's tables; adopts any state the
    parameters already have (a loaded state_dict)."""

    def __init__(self, params: list[torch.Tensor], state: dict, capturable: bool = False):
        self.params = list(params)
        self.device = params[0].device  # one device: the optimizer lays out each device's part apart
        self.use_triton = _use_triton(self.device)
        numel = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]
        total = sum(numel)
        self.exp_avg = torch.zeros(total, dtype=torch.bfloat16, device=self.device)
        self.exp_avg_sq = torch.zeros(total, dtype=torch.bfloat16, device=self.device)
        starts, start, seeds = [], 0, []
        for p, n in zip(params, numel):
            starts.append(start)
            held = state.get(p, {})
            m, v = self.exp_avg[start:start + n].view(p.shape), self.exp_avg_sq[start:start + n].view(p.shape)
            if "exp_avg" in held:
                for name, flat in (("exp_avg", m), ("exp_avg_sq", v)):
                    if held[name].shape != p.shape:
                        raise ValueError(f"state: {name} of shape {list(held[name].shape)} for a parameter of "
                                         f"shape {list(p.shape)}")
                    flat.copy_(held[name])
            step = held.get("step", torch.tensor(0.0))
            seed = held.get("seed")
            seed = _new_seed() if seed is None else int(seed)
            state[p] = {"step": torch.as_tensor(step, dtype=torch.float32).clone().cpu(), "exp_avg": m,
                        "exp_avg_sq": v, "seed": seed}
            seeds.append(seed)
            start += n
        # capturable: the counts on the device, one [P] tensor stepped in one op; the state holds views of it
        self.steps = None
        if capturable:
            self.steps = torch.stack([state[p]["step"] for p in params]).to(self.device)
            for i, p in enumerate(params):
                state[p]["step"] = self.steps[i]
        if self.use_triton:
            from ..kernels.adamw import BLOCK

            segments = [(s, offset) for s, n in enumerate(numel) for offset in range(0, n, BLOCK)]
            as_tensor = lambda values, dtype=torch.int64: _to_device(values, dtype, self.device)  # noqa: E731
            self.block_segment = as_tensor([s for s, _ in segments], torch.int32)
            self.block_offset = as_tensor([offset for _, offset in segments])
            self.base, self.numel, self.seeds = as_tensor(starts), as_tensor(numel), as_tensor(seeds)
            self.param_ptrs, self.grad_ptrs = _AddressTable(self.device), _AddressTable(self.device)

    def holds(self, params: list[torch.Tensor], state: dict, capturable: bool = False) -> bool:
        """Whether this layout is still the one for params and their state (a cleared state starts over), with its
        step counts where capturable asks (on the device, or on the host)."""
        return len(self.params) == len(params) and all(a is b for a, b in zip(self.params, params)) \
            and all("step" in state.get(p, {}) for p in params) and (self.steps is not None) == capturable

    def check(self) -> None:
        """The kernel writes fp32 through each parameter's address, for the numel it was laid out with: refuse a
        parameter changed since (another dtype, shape or layout) rather than write past it. (A parameter moved to
        another device lands in another part, laid out anew: AdamWBf16.step.)"""
        for p, shape in zip(self.params, self.shapes):
            if p.shape != shape or p.dtype != torch.float32 or not p.is_contiguous():
                raise ValueError("params: a parameter changed shape, dtype or layout after AdamWBf16's first "
                                 "step; make a new optimizer for it")


class _AddressTable:
    """Tensors' addresses (0: None) as a device table for the kernel, made again only when an address changed: a
    parameter moved (.data = a copy), or a gradient landed in another block. The caching allocator mostly hands a
    chunk's gradients the same blocks every step, and a host list pinned and copied at every chunk's step was a
    visible share of the backward thread's time (NOTES run 60c)."""

    def __init__(self, device: torch.device):
        self.device, self._addresses, self._table = device, None, None
        self._captured: list[torch.Tensor] = []  # the tables CUDA graphs recorded

    def __call__(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        addresses = tuple(0 if t is None else t.data_ptr() for t in tensors)
        if _capturing(self.device):
            # Always a table of the graph's own, kept for this table's life: one an eager step made would be freed
            # when a later step's addresses change, while the graph still reads it at every replay.
            self._table = _to_device(list(addresses), torch.int64, self.device)
            self._captured.append(self._table)
            self._addresses = addresses
        elif addresses != self._addresses:
            self._table = _to_device(list(addresses), torch.int64, self.device)
            self._addresses = addresses
        return self._table


def round_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The kernel's rounding in torch: fp32 -> bf16, up with probability equal to the fraction of an ulp dropped
    (x finite)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536: 0xFFFF0000 as an int32


def _step_torch(layout: _Layout, corrections: list[float], state: dict, *, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """The kernel's update in torch, parameter by parameter (CPU); the noise keyed by (seed, step) as there."""
    start = 0
    for i, p in enumerate(layout.params):
        n = p.numel()
        bc1, bc2, t = corrections[3 * i:3 * i + 3]
        if bc1 != 0.0:
            generator = torch.Generator(device=layout.device).manual_seed(
                (state[p]["seed"] + int(t) * 1000003) & 0x7FFFFFFF)
            g = p.grad.reshape(-1).float()
            m = layout.exp_avg[start:start + n].float().mul_(beta1).add_(g, alpha=1.0 - beta1)
            v = layout.exp_avg_sq[start:start + n].float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            flat = p.view(-1)
            flat.mul_(1.0 - lr * weight_decay)
            flat.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)
            layout.exp_avg[start:start + n] = round_bf16_stochastic(m, generator)
            layout.exp_avg_sq[start:start + n] = round_bf16_stochastic(v, generator)
        start += n
