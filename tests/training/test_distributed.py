"""Several processes: a moetune model under torch's DistributedDataParallel and under FSDP2 (fully_shard on each
decoder layer and the root), two ranks on CPU (gloo). The LoRA gradients they average must be what one process
computes over both ranks' batches, with and without gradient checkpointing and on each attention and expert layout;
the adapter saved from FSDP2's gathered state dict is one process's; StepInBackward, which would step before the
averaging, is refused there."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models.helpers import randomize_lora_B, save_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2


def _build(model_dir: str, checkpointing: bool):
    import moetune

    torch.manual_seed(0)
    model, _ = moetune.FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    model = moetune.FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    randomize_lora_B(model)  # B = 0 would leave A's gradients zero on every path
    return model.train()  # (from_pretrained gives eval mode, where transformers checkpoints nothing)


def _count_expert_calls() -> list[bool]:
    """Each experts call from here on, True where it is a checkpoint's recompute."""
    from moetune.models import hook

    calls, real = [], hook.moe_experts

    def counting(*args, **kwargs):
        calls.append(bool(kwargs.get("only_for_backward")))
        return real(*args, **kwargs)

    hook.moe_experts = counting
    return calls


def _fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from moetune.fast_model import _decoder_layers

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _save_from_fsdp2(model, rank: int, out: str) -> None:
    """As Trainer and accelerate save under FSDP: the full state dict gathered on every rank, written by rank 0. A
    save without it is refused in one line (the modules hold shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out + ".adapter", state_dict=state)
        try:
            model.save_pretrained(out + ".refused")
        except ValueError as err:
            torch.save(str(err), out + ".save_refusal")


def _ids() -> torch.Tensor:
    return torch.randint(0, 90, (2 * WORLD, 12), generator=torch.Generator().manual_seed(3))


def _rank_batch(rank: int) -> torch.Tensor:
    return _ids()[2 * rank:2 * rank + 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, model_dir: str, checkpointing: bool, wrapper: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", USE_HUB_KERNELS="NO")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        calls = _count_expert_calls()
        model = _build(model_dir, checkpointing)
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if wrapper == "ddp" else _fsdp2(model)
        ids = _rank_batch(rank)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        # FSDP2's gradients are this rank's shards: full_tensor gathers them (a collective: every rank)
        grads = {n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)()
                 for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save({"grads": grads, "expert_calls": calls}, out)
        if wrapper == "fsdp2":
            _save_from_fsdp2(model, rank, out)
        from moetune.training.step_in_backward import StepInBackward

        try:
            StepInBackward([p for p in model.parameters() if p.requires_grad], torch.optim.AdamW, lr=1e-3)
        except RuntimeError as err:
            if rank == 0:
                torch.save(str(err), out + ".refusal")
        dist.barrier()
    except BaseException:
        traceback.print_exc()  # (to the test's captured stderr; the exit code fails the test)
        os._exit(1)
    # Leave without the teardown, either way. Destroying DDP's reducer after a checkpointed backward can deadlock
    # torch 2.13 on CPU: its destructor joins gloo's worker thread holding the GIL, while that thread waits for the
    # GIL to drop a Python object (the checkpoint's saved-tensor hooks) captured in a finished allreduce's thread
    # state (seen in CI: one run of this file in ~20; py-spy --native on the stuck rank).
    os._exit(0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "glm4_moe_lite"])
@pytest.mark.parametrize("wrapper, checkpointing", [("ddp", False), ("ddp", True), ("fsdp2", True)],
                         ids=["ddp-plain", "ddp-checkpointed", "fsdp2-checkpointed"])
def test_the_ranks_average_the_gradients_one_process_computes(tmp_path, model_type, wrapper, checkpointing):
    model_dir = save_checkpoint(model_type, str(tmp_path / "model"))
    out = str(tmp_path / "grads.pt")
    mp.spawn(_rank, args=(_free_port(), model_dir, checkpointing, wrapper, out), nprocs=WORLD)
    saved = torch.load(out)
    got, calls = saved["grads"], saved["expert_calls"]
    assert sum(calls) == (len(calls) // 2 if checkpointing else 0) and calls  # each MoE layer recomputed once

    model = _build(model_dir, checkpointing)
    losses = [model(input_ids=_rank_batch(r), labels=_rank_batch(r)).loss for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and all(g is not None for g in got.values())
    assert any("experts" in n for n in want)  # the 3-D expert LoRA factors are among them
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    refusal = torch.load(out + ".refusal")
    assert refusal.startswith("StepInBackward: not with several processes")
    if wrapper == "fsdp2":
        from safetensors.torch import load_file

        model.save_pretrained(str(tmp_path / "one_process"))
        one, gathered = (load_file(os.path.join(d, "adapter_model.safetensors"))
                         for d in (str(tmp_path / "one_process"), out + ".adapter"))
        assert set(one) == set(gathered) and all(torch.equal(one[k], gathered[k]) for k in one)
        assert torch.load(out + ".save_refusal").startswith("state_dict: the model is sharded (FSDP)")
