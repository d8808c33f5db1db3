"""FastMoEModel: loading, the experts hook on the instance, LoRA targets, routers, bad input, training."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moetune import FastMoEModel
from moetune.models import IMPLEMENTATION, SUPPORTED_MODEL_TYPES, get_spec, install, uninstall

from .models.helpers import (
    ALL_ARCHS,
    auto_class,
    checkpoint,  # noqa: F401  (session fixture)
    plain_peft_model,
    randomize_lora_B,
    relative_error,
    token_batch,
)
from .models.tiny import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")


def _load(model_dir_or_config, **kwargs):
    return FastMoEModel.from_pretrained(model_dir_or_config, dtype=torch.float32, **kwargs)


# --- loading -----------------------------------------------------------------------------------------


def test_from_directory_returns_tokenizer_and_routes_experts_through_moetune(checkpoint):
    model, tokenizer = _load(checkpoint("qwen3_moe"), max_seq_length=64)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerBase) and tokenizer.model_max_length == 64
    assert model.max_seq_length == 64
    assert model.config._experts_implementation == IMPLEMENTATION
    assert tokenizer("the router picks two experts")["input_ids"]


def test_loading_asks_for_no_hub_kernels(checkpoint, monkeypatch):
    # transformers >= 5.25 loads the `kernels` library's Hub kernels unless told not to (the suite turns them off
    # through USE_HUB_KERNELS for its plain-transformers references): moetune's own loading must not need that.
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    seen = {}
    real = transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    assert seen.get("use_kernels") is False and not model.use_kernels


def test_from_config_is_random_init_without_tokenizer():
    model, tokenizer = _load(tiny_config("gpt_oss"))
    assert tokenizer is None
    assert model.config._attn_implementation == "eager"  # sinks: never sdpa; flex only on CUDA
    with torch.no_grad():
        assert torch.isfinite(model(token_batch()).logits).all()


@pytest.mark.parametrize("head_dim, device_map, expected", [(64, "cuda", "flex_attention"), (8, "cuda", "eager"),
                                                             (64, None, "eager"), (64, "cpu", "eager")])
def test_gpt_oss_gets_flex_attention_only_where_it_runs(monkeypatch, head_dim, device_map, expected):
    """Flex attention needs CUDA and a head dim of at least 16 (torch's compiled kernels; run 62d: a tiny gpt-oss
    with head dim 8 failed its first step on an H100); sdpa has no sinks, so eager otherwise."""
    from moetune.fast_model import choose_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = tiny_config("gpt_oss")
    config.head_dim = head_dim
    assert choose_attention(get_spec("gpt_oss"), None, device_map, config) == expected
    assert choose_attention(get_spec("gpt_oss"), "flex_attention", device_map, config) == "flex_attention"  # asked


def test_directory_without_tokenizer(tmp_path):
    auto_class("olmoe").from_config(tiny_config("olmoe")).save_pretrained(tmp_path)
    _, tokenizer = _load(str(tmp_path))
    assert tokenizer is None


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_per_expert_checkpoint_is_converted_on_load(model_type, tmp_path):
    """Older checkpoints store one Linear per expert; transformers fuses them on load, moetune runs the result."""
    torch.manual_seed(0)
    fused = auto_class(model_type).from_config(tiny_config(model_type), dtype=torch.float32)
    fused.save_pretrained(tmp_path)
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    path = next(tmp_path.glob("*.safetensors"))
    state, legacy = load_file(path), {}
    for key, value in state.items():
        if key.endswith("experts.gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                legacy[key.replace("gate_up_proj", f"{e}.{names[0]}.weight")] = gate[e].clone()
                legacy[key.replace("gate_up_proj", f"{e}.{names[1]}.weight")] = up[e].clone()
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                legacy[key.replace("down_proj", f"{e}.{names[2]}.weight")] = value[e].clone()
        else:
            legacy[key] = value
    save_file(legacy, path, metadata={"format": "pt"})
    model, _ = _load(str(tmp_path))
    ids = token_batch()
    with torch.no_grad():
        assert relative_error(model(ids).logits, fused(ids).logits) < 1e-5


def test_install_shares_storage_and_is_per_instance(checkpoint):
    spec = get_spec("qwen3_moe")
    model = auto_class("qwen3_moe").from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    other = auto_class("qwen3_moe").from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
        experts = install(model, spec)
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
        assert model.config._experts_implementation == IMPLEMENTATION
        assert other.config._experts_implementation != IMPLEMENTATION  # no class-level patch
        assert relative_error(model(ids).logits, expected) < 1e-5
        uninstall(model)
        assert model.config._experts_implementation != IMPLEMENTATION
        assert not any(hasattr(m, "moetune_binding") for m in experts.values())


def test_a_config_given_to_from_pretrained_is_left_as_it_was():
    """transformers' from_config keeps the caller's config object: moetune's settings (experts implementation,
    use_cache) must go to a copy, or a plain model built from the same config later would run moetune's experts
    unbound, and uninstalling one model would switch a sibling's experts (and drop its expert LoRA)."""
    config = tiny_config("qwen3_moe")
    before = (config._experts_implementation, config.use_cache)
    model, _ = _load(config)
    FastMoEModel.get_peft_model(model, r=2)
    assert model.config is not config and (config._experts_implementation, config.use_cache) == before
    plain = auto_class("qwen3_moe").from_config(config, dtype=torch.float32)
    with torch.no_grad():
        plain(token_batch())  # transformers' own experts


def test_uninstall_undoes_a_peft_model_and_get_peft_model_refuses_it_after(checkpoint):
    model, _ = _load(checkpoint("qwen3_moe"))
    peft_model = FastMoEModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    uninstall(peft_model)  # reaches the base model: peft forwards reads, not deletes
    assert model.config._experts_implementation != IMPLEMENTATION
    assert not any(hasattr(m, "moetune_binding") or hasattr(m, "lora_A_gate_up") for m in model.modules())
    fresh, _ = _load(checkpoint("qwen3_moe"))
    uninstall(fresh)
    with pytest.raises(ValueError, match="model: its experts no longer run on moetune"):
        FastMoEModel.get_peft_model(fresh, r=2)


def test_full_finetuning_falls_back_to_transformers_experts():
    """Trainable base expert weights: moetune (LoRA-only) hands the call to transformers with a warning."""
    model, _ = _load(tiny_config("qwen3_moe"))
    with pytest.warns(UserWarning, match="expert base weights are trainable"):
        model(token_batch()).logits.sum().backward()
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is not None


# --- bad input -----------------------------------------------------------------------------------------


def test_device_map_to_a_gpu_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^device_map: expected a device this machine has, got cuda:2 but it has 1"):
        FastMoEModel.from_pretrained(tiny_config("qwen3_moe"), device_map=2)


def test_unsupported_model_type_lists_the_supported_ones():
    config = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    with pytest.raises(ValueError, match="model_type: expected one of " + ", ".join(SUPPORTED_MODEL_TYPES)):
        _load(config)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_dir_or_config="/no/such/dir"), "model_dir_or_config: expected a local checkpoint directory"),
        (dict(max_seq_length=0), "max_seq_length: expected an integer >= 1"),
        (dict(attn_implementation="sdpa", model_type="gpt_oss"), "attn_implementation: gpt_oss needs one of"),
        (dict(device_map="cdua"), r"device_map: expected a torch device such as 'cpu' or 'cuda:0', got 'cdua'"),
        (dict(device_map=-1), "device_map: expected a GPU index >= 0, got -1"),
        (dict(device_map=["cpu"]), "device_map: expected a device, a GPU index, .* got list"),
        (dict(device_map="auto"), "device_map: expected a device for a config"),
    ],
)
def test_from_pretrained_rejects_bad_input(kwargs, match):
    source = kwargs.pop("model_dir_or_config", None) or tiny_config(kwargs.pop("model_type", "qwen3_moe"))
    with pytest.raises(ValueError, match=match):
        FastMoEModel.from_pretrained(source, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r: expected an integer >= 1"),
        (dict(r=2.5), "r: expected an integer >= 1"),
        (dict(r=True), "r: expected an integer >= 1"),
        (dict(lora_alpha=0), "lora_alpha: expected a finite number > 0"),
        (dict(lora_alpha=float("inf")), "lora_alpha: expected a finite number > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout: expected a number in \[0, 1\)"),
        (dict(lora_dropout=0.1), "lora_dropout: expected 0 with LoRA on the experts"),
        (dict(target_modules=()), "target_modules: expected a non-empty sequence"),
        (dict(target_modules=("q_prj",)), "target_modules: expected names from .*got 'q_prj'"),
        (dict(target_modules=("q_proj", "gate")), "target_modules: 'gate' is a router"),
        (dict(use_gradient_checkpointing="yes"), "use_gradient_checkpointing: expected True or False"),
        (dict(train_router=1), "train_router: expected True or False"),
        (dict(offload_checkpoints="auto"), "offload_checkpoints: expected True or False"),
        (dict(checkpoint_layers=-1), "checkpoint_layers: expected None or an integer >= 0"),
        (dict(checkpoint_layers=True), "checkpoint_layers: expected None or an integer >= 0"),
        (dict(checkpoint_layers=3), "checkpoint_layers: expected at most the model's 2 decoder layers, got 3"),
    ],
)
def test_get_peft_model_rejects_bad_input(kwargs, match):
    model, _ = _load(tiny_config("qwen3_moe"))
    with pytest.raises(ValueError, match=match):
        FastMoEModel.get_peft_model(model, **kwargs)


def test_get_peft_model_needs_a_moetune_model():
    plain = auto_class("qwen3_moe").from_config(tiny_config("qwen3_moe"))
    with pytest.raises(ValueError, match="model: expected a model from moetune.FastMoEModel.from_pretrained"):
        FastMoEModel.get_peft_model(plain)


def test_shared_expert_gate_is_a_router():
    model, _ = _load(tiny_config("qwen2_moe"))
    with pytest.raises(ValueError, match="'shared_expert_gate' is a router"):
        FastMoEModel.get_peft_model(model, target_modules=("shared_expert_gate",))


# --- targets and training ------------------------------------------------------------------------------


def test_linear_targets_use_peft_lora_on_shared_experts_and_dense_mlp():
    """qwen2_moe: LoRA on attention, and on the shared expert and dense MLP Linear layers where peft keeps their
    names (peft 0.21); peft >= 0.22 reads gate_proj / up_proj / down_proj on qwen2_moe as its fused experts' too
    (an adapter with them on the Linear layers would load with the experts' gate_up LoRA at twice the rank): then
    those Linear layers get none, and a warning says so."""
    from peft.tuners.lora import Linear as LoraLinear

    from moetune.fast_model import peft_expert_aliases

    model, _ = _load(tiny_config("qwen2_moe"))
    mlp_names = {"gate_proj", "up_proj", "down_proj"}
    renamed = peft_expert_aliases(model, mlp_names)
    assert renamed in (set(), mlp_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = FastMoEModel.get_peft_model(model, r=2, target_modules=("q_proj", *sorted(mlp_names)))
    wrapped = {n.split("model.model.", 1)[1] for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    wrapped = {n.removeprefix("model.") for n in wrapped}
    on_mlps = {"layers.0.mlp.down_proj", "layers.1.mlp.shared_expert.up_proj"}
    renaming = [str(w.message) for w in caught if "as the fused experts' weights" in str(w.message)]
    if renamed:
        assert not on_mlps & wrapped and len(renaming) == 1
    else:
        assert on_mlps <= wrapped and not renaming
    assert "layers.1.self_attn.q_proj" in wrapped
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert experts.lora_A_gate_up.default.weight.requires_grad and experts.lora_A_down.default.weight.requires_grad


@pytest.mark.parametrize("q_lora_rank", [16, None], ids=["q_a-q_b", "q_proj"])
@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe_lite"])
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_the_default_targets_take_latent_attentions_own_projections(model_type, q_lora_rank):
    """Attention and experts by default: multi-head latent attention has no k_proj / v_proj (and q_proj only without
    a low-rank query), so the default stands for its own projections instead of leaving it o_proj alone."""
    from peft.tuners.lora import Linear as LoraLinear

    config = tiny_config(model_type)
    config.q_lora_rank = q_lora_rank
    model, _ = _load(config)
    model = FastMoEModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
               if isinstance(m, LoraLinear) and ".layers.1." in n}
    queries = {"q_a_proj", "q_b_proj"} if q_lora_rank else {"q_proj"}
    assert wrapped == queries | {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert experts.lora_A_gate_up.default.weight.requires_grad and experts.lora_A_down.default.weight.requires_grad
    named = FastMoEModel.get_peft_model(_load(config)[0], r=2, use_gradient_checkpointing=False,
                                        target_modules=("o_proj", "gate_up_proj", "down_proj"))
    assert {n.rsplit(".", 1)[-1] for n, m in named.named_modules() if isinstance(m, LoraLinear)} == {"o_proj"}
    reordered = FastMoEModel.get_peft_model(_load(config)[0], r=2, use_gradient_checkpointing=False,
                                            target_modules=["down_proj", "v_proj", "gate_up_proj", "o_proj", "k_proj",
                                                            "q_proj"])  # the default's names in any order
    assert {n.rsplit(".", 1)[-1] for n, m in reordered.named_modules()
            if isinstance(m, LoraLinear) and ".layers.1." in n} == wrapped


def _routers(model, spec):
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(f"{r}." in n for r in spec.router_modules)
    }


@ALL_ARCHS
def test_training_lowers_the_loss_and_leaves_routers_alone(model_type, checkpoint):
    torch.manual_seed(0)
    model, _ = _load(checkpoint(model_type))
    spec = get_spec(model_type)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)  # checkpointing on (the default)
    model.train()
    routers = _routers(model, spec)
    assert routers and not any(p.requires_grad for n, p in model.named_parameters() if n in routers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = (torch.arange(24).reshape(2, 12) % 5 + 10)  # a periodic sequence: learnable by the adapter alone
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # Tiny random models plateau near ln(vocab) - 0.6 (frozen random lm_head); 20 steps took off 0.36..0.61
    # for every architecture and LoRA seed tried (0, 1, 2).
    assert losses[-1] < losses[0] - 0.25, losses
    for name, before in routers.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name


def test_train_router_trains_router_weights_in_full():
    torch.manual_seed(0)
    model, _ = _load(tiny_config("qwen2_moe"))
    model = FastMoEModel.get_peft_model(model, r=2, train_router=True, use_gradient_checkpointing=False)
    copies = {n: p for n, p in model.named_parameters() if "modules_to_save" in n}
    assert any(".mlp.gate." in n for n in copies) and any("shared_expert_gate" in n for n in copies)
    assert all(p.requires_grad for p in copies.values())
    before = {n: p.detach().clone() for n, p in copies.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in copies.items())


# --- transformers.Trainer and trl.SFTTrainer -----------------------------------------------------------


def _trained_adapter_matches_peft(model, model_dir, adapter_dir):
    model.save_pretrained(adapter_dir)
    reference = plain_peft_model(model_dir, adapter_dir)
    ids = token_batch()
    model.eval()
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < 1e-4


def test_transformers_trainer(checkpoint, tmp_path):
    model_dir = checkpoint("glm4_moe_lite")
    model, tokenizer = _load(model_dir)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8)
    ids = token_batch(batch=8, length=12)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0] and result.global_step == 4
    _trained_adapter_matches_peft(model, model_dir, tmp_path / "adapter")


def _no_trainer_checkpointing(config_class) -> dict:
    # transformers >= 5.2x renamed the field to activation_checkpointing (the old one warns); 5.17 has the old one.
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": False}


def test_trl_sft_trainer(checkpoint, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from .models.helpers import SENTENCES

    model_dir = checkpoint("gpt_oss")
    model, tokenizer = _load(model_dir)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, max_length=16, bf16=False,
        **_no_trainer_checkpointing(trl.SFTConfig),  # get_peft_model already enabled it on the model
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": SENTENCES * 4}), processing_class=tokenizer
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    _trained_adapter_matches_peft(model, model_dir, tmp_path / "adapter")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL reads it
def test_trl_dpo_trainer_trains_against_a_copy_of_the_adapter(checkpoint, tmp_path):
    """DPOTrainer with a PeftModel and no ref_model keeps its reference as a second adapter, a copy of the first:
    with LoRA on the experts only, the expert LoRA must still train (peft froze it), and the reference must stay
    the adapter the run started from (not the trained experts)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.utils import use_adapter

    from .models.helpers import SENTENCES

    model_dir = checkpoint("qwen3_moe")
    model, tokenizer = _load(model_dir)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=("gate_up_proj", "down_proj"),
                                        use_gradient_checkpointing=False)
    randomize_lora_B(model)
    ids = token_batch()
    with torch.no_grad():
        initial = model(ids).logits
    words = " ".join(SENTENCES).split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "chosen": " ".join(words[i + 4:i + 7]),
             "rejected": " ".join(words[i + 7:i + 10])} for i in range(0, 48, 3)]
    config = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                           learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                           seed=0, bf16=False, max_length=24, **_no_trainer_checkpointing(trl.DPOConfig))
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert "ref" in model.peft_config
    trainer.train()
    assert all(entry["grad_norm"] > 0 for entry in trainer.state.log_history if "grad_norm" in entry)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        with use_adapter(model, "ref"):
            reference = model(ids).logits
    assert relative_error(trained, initial) > 1e-3 and relative_error(reference, initial) < 1e-6


def test_offloaded_checkpoints_follow_the_device_unless_asked():
    """Offloading is on by default only for a model on CUDA; asked for, it runs on CPU too with the same loss."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from moetune.training.offload import offloaded_checkpoint

    def offloading(peft_model) -> list[bool]:
        layers = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        assert layers
        return [getattr(m._gradient_checkpointing_func, "func", None) is offloaded_checkpoint for m in layers]

    ids = torch.arange(24).reshape(2, 12) % 5 + 10
    losses = []
    for offload in (None, True):
        torch.manual_seed(0)  # the same random base model both times
        model, _ = _load(tiny_config("qwen3_moe"))
        peft_model = FastMoEModel.get_peft_model(model, r=4, random_state=0, offload_checkpoints=offload)
        assert all(offloading(peft_model)) if offload else not any(offloading(peft_model))
        peft_model.train()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append((loss.item(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    assert losses[0][0] == losses[1][0]
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1]))


def test_offloading_without_checkpointing_warns_and_does_nothing():
    model, _ = _load(tiny_config("qwen3_moe"))
    with pytest.warns(UserWarning, match="offload_checkpoints: needs use_gradient_checkpointing=True"):
        FastMoEModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, offload_checkpoints=True)


@pytest.mark.parametrize("offload", [False, True])
def test_checkpoint_layers_leaves_the_last_layers_unrecomputed_with_the_same_gradients(offload):
    """checkpoint_layers=N checkpoints the first N decoder layers only (offloading those); loss and every LoRA
    gradient equal full checkpointing's bitwise, and the layers left out run once per step, not twice."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids = torch.arange(24).reshape(2, 12) % 5 + 10
    results = {}
    for layers in (None, 1, 0):
        torch.manual_seed(0)
        model, _ = _load(tiny_config("qwen3_moe"))
        peft_model = FastMoEModel.get_peft_model(
            model, r=4, random_state=0, offload_checkpoints=offload, checkpoint_layers=layers
        )
        decoder = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [m.gradient_checkpointing for m in decoder] == {None: [True, True], 1: [True, False], 0: [False, False]}[layers]
        calls = []
        for i, layer in enumerate(decoder):
            # a pre-hook: the recompute stops early once it has rebuilt what backward needs (no forward hook then)
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.append(i))
        peft_model.train()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[layers] = (loss.item(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad])
        assert sorted(calls) == {None: [0, 0, 1, 1], 1: [0, 0, 1], 0: [0, 1]}[layers]
    for layers in (1, 0):
        assert results[layers][0] == results[None][0]
        assert all(torch.equal(a, b) for a, b in zip(results[layers][1], results[None][1]))


def test_checkpoint_layers_without_checkpointing_warns():
    model, _ = _load(tiny_config("qwen3_moe"))
    with pytest.warns(UserWarning, match="checkpoint_layers: needs use_gradient_checkpointing=True"):
        FastMoEModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, checkpoint_layers=1)


def test_a_directory_without_config_json_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^model_dir_or_config: .* has no config.json \(not a model checkpoint\)"):
        FastMoEModel.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_checkpointing_leaves_use_cache_to_the_config_outside_training(model_type, checkpoint):
    """A training forward builds no KV cache; eval and no-grad forwards keep the config's use_cache, and so does a
    config saved from the model (an in-process merge), as plain peft's would."""
    model, _ = _load(checkpoint(model_type))
    peft_model = FastMoEModel.get_peft_model(model, r=2, checkpoint_layers=1)  # layer 2 is not checkpointed
    assert model.config.use_cache is True
    ids = token_batch(2, 9)

    def cache(out):
        return out.get("past_key_values", out.get("cache"))

    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids)
    assert cache(out) is None
    out.loss.backward()
    peft_model.eval()  # (train mode under no_grad is transformers' call: 5.17 drops the cache there, 5.25 keeps it)
    assert cache(peft_model(input_ids=ids)) is not None
    with torch.no_grad():
        assert cache(peft_model(input_ids=ids)) is not None
    assert peft_model.merge_and_unload().config.to_dict()["use_cache"] is True
