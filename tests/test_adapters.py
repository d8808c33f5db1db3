"""moetune.adapters: the PEFT target_parameters layout, adapter save/load and merge, pinned against peft itself."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

import moetune
from moetune import FastMoEModel
from moetune.adapters import (
    expert_factors_from_peft,
    expert_factors_to_peft,
    expert_peft_keys,
)
from moetune.experts import ExpertLoRA, moe_experts

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


class _Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])  # [E, 2I, H] concat; [E, H, 2I] interleaved
def test_converter_matches_peft_param_wrapper(model_type):
    """Factors written into PEFT's ParamWrapper via expert_factors_to_peft give moetune's output, and read back."""
    torch.manual_seed(0)
    config = tiny_config(model_type)
    layer = auto_class(model_type).from_config(config, dtype=torch.float32).model.layers[-1].mlp
    experts = layer.experts.requires_grad_(False)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    E, rank = experts.gate_up_proj.shape[0], 3
    holder = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=6, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        _Holder(experts),
    )
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if model_type == "gpt_oss":
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    two_i, hidden = gate_up.shape[1], gate_up.shape[2]
    lora = ExpertLoRA(
        torch.randn(E, rank, hidden), torch.randn(E, two_i, rank), torch.randn(E, rank, two_i // 2),
        torch.randn(E, hidden, rank), scaling=2.0,
    )
    wrapper_down, wrapper_gate_up = holder.experts, holder.experts.base_layer
    with torch.no_grad():
        for wrapper, A, B in ((wrapper_gate_up, lora.A_gate_up, lora.B_gate_up), (wrapper_down, lora.A_down, lora.B_down)):
            peft_A, peft_B = expert_factors_to_peft(A, B)
            wrapper.lora_A["default"].weight.copy_(peft_A)
            wrapper.lora_B["default"].weight.copy_(peft_B)
            back_A, back_B = expert_factors_from_peft(wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight, E)
            assert torch.equal(back_A, A) and torch.equal(back_B, B)
    assert wrapper_gate_up.parameter_name == "gate_up_proj" and wrapper_down.parameter_name == "down_proj"

    x = torch.randn(7, hidden)
    weights, ids = torch.randn(7, E).softmax(-1).topk(2, dim=-1)
    expected = holder.experts(x, ids, weights)
    bias = dict(gate_up_bias=experts.gate_up_proj_bias, down_bias=experts.down_proj_bias) if model_type == "gpt_oss" else {}
    got = moe_experts(
        x, ids, weights, gate_up, down, lora=lora, backend="native", interleaved=model_type == "gpt_oss",
        activation=moetune.models.get_spec(model_type).activation(config, experts), **bias,
    )
    assert relative_error(got, expected) < 1e-5


def test_peft_keys_nest_gate_up_inside_down():
    keys = expert_peft_keys("m.experts", ("gate_up_proj", "down_proj"))
    assert keys["gate_up_proj"] == ("m.experts.base_layer.lora_A.weight", "m.experts.base_layer.lora_B.weight")
    assert keys["down_proj"] == ("m.experts.lora_A.weight", "m.experts.lora_B.weight")
    assert expert_peft_keys("m.experts", ("down_proj",))["down_proj"][0] == "m.experts.lora_A.weight"


def test_from_peft_rejects_a_rank_that_does_not_split(tmp_path):
    with pytest.raises(ValueError, match="A: expected 4 experts"):
        expert_factors_from_peft(torch.zeros(6, 8), torch.zeros(8, 6), 4)


def _peft_model(model_dir, **kwargs):
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **kwargs)
    randomize_lora_B(model)
    return model


@ALL_ARCHS
def test_merged_checkpoint_gives_the_adapters_logits(model_type, checkpoint, tmp_path):
    model_dir = checkpoint(model_type)
    model = _peft_model(model_dir)
    model.save_pretrained(tmp_path / "adapter")
    out = moetune.merge(model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = auto_class(model_type).from_pretrained(
        tmp_path / "merged", dtype=torch.float32, experts_implementation="eager", local_files_only=True
    )
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
        base = auto_class(model_type).from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        assert relative_error(base(ids).logits, expected) > 1e-3  # the adapter matters
        assert relative_error(merged(ids).logits, expected) < 1e-4


def test_adapter_config_is_peft_target_parameters(checkpoint, tmp_path):
    model = _peft_model(checkpoint("qwen3_moe"))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # as peft's own save writes them: AutoPeftModelForCausalLM loads the base model from this path
    assert config["base_model_name_or_path"] == checkpoint("qwen3_moe") and config["inference_mode"] is True


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_a_resized_vocabulary_saves_the_embeddings(checkpoint, tmp_path):
    """As peft's save (save_embedding_layers="auto"): new token rows are trained state the adapter must carry."""
    from safetensors.torch import load_file

    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in saved) and any("lm_head" in k for k in saved)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_load_adapter_weights_round_trip(model_type, checkpoint, tmp_path):
    """save -> load into a fresh moetune model with the same targets -> identical logits."""
    model_dir = checkpoint(model_type)
    model = _peft_model(model_dir)
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    fresh = FastMoEModel.get_peft_model(fresh, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    fresh.load_adapter(str(tmp_path / "adapter"), "default")
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_load_adapter_weights_refuses_another_rank_scale_or_targets(checkpoint, tmp_path):
    """Another alpha would load silently and scale every update differently; another rank or fewer targets must
    say so in one line, not fail deep in a copy or leave modules at their initial values."""
    model_dir = checkpoint("qwen3_moe")
    _peft_model(model_dir).save_pretrained(tmp_path / "adapter")

    def load_into(**kwargs):
        fresh, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
        fresh = FastMoEModel.get_peft_model(fresh, use_gradient_checkpointing=False, **{"r": 4, "lora_alpha": 8, **kwargs})
        fresh.load_adapter(str(tmp_path / "adapter"), "default")

    with pytest.raises(ValueError, match="adapter_dir: saved with lora_alpha=8, this model has lora_alpha=32"):
        load_into(lora_alpha=32)
    with pytest.raises(ValueError, match="adapter_dir: saved with r=4, this model has r=8"):
        load_into(r=8)
    with pytest.raises(ValueError, match="adapter_dir: no weights for this model's .*lm_head.lora_A"):
        load_into(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"))
    with pytest.raises(ValueError, match=r"adapter_dir: saved with modules_to_save=\[\] \(train_router\), this model"):
        load_into(train_router=True)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss", "deepseek_v3"])  # shared_expert_gate; router bias; correction bias
def test_trained_router_round_trips_through_peft(model_type, checkpoint, tmp_path):
    """train_router=True saves routers as peft modules_to_save; plain peft loads them and gives our logits."""
    model_dir = checkpoint(model_type)
    model = _peft_model(model_dir, train_router=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "adapter")
    reference = plain_peft_model(model_dir, tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < 1e-4


def test_merge_rejects_bad_directories(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="model_dir"):
        moetune.merge(str(tmp_path / "missing"), str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="adapter_dir"):
        moetune.merge(checkpoint("qwen3_moe"), str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("targets", ["default", "experts", "experts+router"])
def test_disable_adapter_gives_the_base_model(model_type, targets, checkpoint):
    """peft's `with model.disable_adapter():` (TRL's reference model for DPO, KTO, GRPO) turns the expert LoRA off
    too, also with LoRA on the experts only (where peft alone finds no adapter layer and refuses), and back on after."""
    model_dir = checkpoint(model_type)
    kwargs = {} if targets == "default" else dict(target_modules=("gate_up_proj", "down_proj"),
                                                  train_router=targets == "experts+router")
    model = _peft_model(model_dir, **kwargs).eval()
    ids = token_batch()
    with torch.no_grad():
        base = auto_class(model_type).from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)(ids).logits
        adapted = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
            assert model._adapters_disabled
        again = model(ids).logits
    assert relative_error(adapted, base) > 1e-3  # the adapter matters
    assert relative_error(disabled, base) < 1e-6
    assert torch.equal(again, adapted) and not model._adapters_disabled


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_merge_unties_an_adapted_tied_lm_head(model_type, tmp_path, monkeypatch):
    """tie_word_embeddings with LoRA on lm_head: the adapter model changes the output embedding only, so the merged
    checkpoint gets an lm_head of its own (folding the change into the shared weight changed the embedding too)."""
    from .models import helpers

    tied = helpers.tiny_config(model_type)
    tied.tie_word_embeddings = True
    monkeypatch.setattr(helpers, "tiny_config", lambda _: tied)
    model_dir = helpers.save_checkpoint(model_type, str(tmp_path / "tied"))
    model = _peft_model(model_dir, target_modules=("q_proj", "gate_up_proj", "lm_head"))
    base = model.get_base_model()
    assert base.lm_head.weight is base.get_input_embeddings().weight  # tied in the adapter model
    model.save_pretrained(tmp_path / "adapter")
    moetune.merge(model_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = auto_class(model_type).from_pretrained(tmp_path / "merged", dtype=torch.float32, local_files_only=True)
    ids = token_batch()
    with torch.no_grad():
        assert relative_error(merged(ids).logits, model(ids).logits) < 1e-5
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight


@pytest.mark.parametrize("targets", [("gate_proj",), ("up_proj", "down_proj")])
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_one_of_gate_and_up_selects_the_fused_gate_up(targets, checkpoint, tmp_path):
    """Where gate and up are fused (deepseek_v3: also a shared expert's Linear gate_proj / up_proj), either name alone
    selects LoRA on gate_up_proj, as the pair does (peft refused the one without the other); plain peft loads it."""
    model_dir = checkpoint("deepseek_v3")
    model = _peft_model(model_dir, target_modules=targets)
    module = next(m for m in model.modules() if hasattr(m, "lora_A_gate_up"))
    assert module.lora_A_gate_up is not None and hasattr(module, "lora_A_down") == ("down_proj" in targets)
    model.save_pretrained(tmp_path / "adapter")
    reference = plain_peft_model(model_dir, tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < 1e-5


def _step_trainable(model) -> None:
    """What training does to the active adapter, as far as these tests see: every trainable parameter moves."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def _trl_reference_copy(model, name="ref"):
    """What TRL's DPO, KTO and GRPO trainers do with a PeftModel and no ref_model: a second adapter of the same
    config, then every `.default.` parameter copied into its `.ref.` twin by name."""
    model.add_adapter(name, model.peft_config["default"])
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".default." in param_name:
                model.get_parameter(param_name.replace(".default.", f".{name}.")).copy_(param)


@pytest.mark.parametrize("targets", ["default", "experts"])
def test_a_second_adapter_is_a_frozen_reference_as_trl_makes_it(targets, checkpoint):
    """TRL's reference adapter covers the expert LoRA: after the default adapter trains on, the reference computes
    the initial adapter's logits; the default adapter stays trainable (with LoRA on the experts only peft froze it),
    the reference frozen; set_adapter and delete_adapter switch and drop the experts' factors with peft's."""
    kwargs = {} if targets == "default" else dict(target_modules=("gate_up_proj", "down_proj"))
    model = _peft_model(checkpoint("qwen3_moe"), **kwargs)
    ids = token_batch()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts.lora_A_gate_up.default." in n for n in trainable)
    with torch.no_grad():
        initial = model(ids).logits
    _trl_reference_copy(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():  # the default adapter trains on
        _step_trainable(model)
        trained = model(ids).logits
        model.set_adapter("ref")
        reference = model(ids).logits
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            n.replace(".default.", ".ref.") for n in trainable}
        model.set_adapter("default")
        assert torch.equal(model(ids).logits, trained)
    assert relative_error(trained, initial) > 1e-3
    assert relative_error(reference, initial) < 1e-6
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.delete_adapter("ref")
    assert list(model.peft_config) == ["default"] and not any(".ref." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained)
    with pytest.raises(ValueError, match="every adapter takes the first one's r, lora_alpha"):
        model.add_adapter("other", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    model.requires_grad_(False)  # (a model handed to inference: nothing trainable)
    with pytest.raises(ValueError, match="adapter_dir: cannot read adapter_config.json in anywhere"):
        model.load_adapter("anywhere", "x")
    assert list(model.peft_config) == ["default"]  # nothing of the failed load left behind, nothing unfrozen
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("targets", ["default", "experts"])
def test_every_adapter_saves_and_loads_where_peft_puts_it(targets, checkpoint, tmp_path):
    """save_pretrained writes the adapters peft's would ("default" in the directory, another in a subdirectory of
    its name; selected_adapters picks), each loading in plain peft with its own logits; load_adapter under a new
    name adds that adapter, frozen until made active."""
    kwargs = {} if targets == "default" else dict(target_modules=("gate_up_proj", "down_proj"))
    model_dir = checkpoint("qwen3_moe")
    model = _peft_model(model_dir, **kwargs)
    ids = token_batch()
    model.add_adapter("b", model.peft_config["default"])
    model.set_adapter("b")
    with torch.no_grad():
        _step_trainable(model)
        logits_b = model(ids).logits
        model.set_adapter("default")
        logits_default = model(ids).logits
    assert relative_error(logits_b, logits_default) > 1e-3

    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert not (tmp_path / "only_b" / "adapter_config.json").exists()
    model.save_pretrained(tmp_path / "all")
    with torch.no_grad():
        for adapter_dir, expected in ((tmp_path / "only_b" / "b", logits_b), (tmp_path / "all" / "b", logits_b),
                                      (tmp_path / "all", logits_default)):
            assert relative_error(plain_peft_model(model_dir, adapter_dir)(ids).logits, expected) < 1e-5
    with pytest.raises(ValueError, match=r"selected_adapters: expected names among \['default', 'b'\], got \['c'\]"):
        model.save_pretrained(tmp_path / "c", selected_adapters=["c"])
    assert not (tmp_path / "c").exists()

    fresh = _peft_model(model_dir, **kwargs)
    fresh.load_adapter(str(tmp_path / "all" / "b"), adapter_name="reference")
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".reference." in n)
    fresh.load_adapter(str(tmp_path / "all" / "b"), adapter_name="trainable", is_trainable=True)  # as peft's
    assert all(p.requires_grad for n, p in fresh.named_parameters() if ".trainable." in n)
    fresh.set_adapter("reference")
    with torch.no_grad():
        assert relative_error(fresh(ids).logits, logits_b) < 1e-6


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])  # gpt-oss: transposed, interleaved, biased experts
def test_merge_unmerge_and_unload_cover_the_experts(model_type, checkpoint):
    """merge_adapter folds the expert LoRA into the base weights too (TRL reads them so for vLLM), unmerge_adapter
    takes it out, merge_and_unload returns the merged base model, unload the base model."""
    model_dir = checkpoint(model_type)
    ids = token_batch()
    model = _peft_model(model_dir)
    experts = next(m for m in model.modules() if hasattr(m, "lora_A_gate_up"))
    before = experts.gate_up_proj.detach().clone()
    with torch.no_grad():
        adapted = model(ids).logits
        model.merge_adapter()
        assert relative_error(model(ids).logits, adapted) < 1e-5
        assert not torch.equal(experts.gate_up_proj, before)
        model.unmerge_adapter()
        assert relative_error(experts.gate_up_proj, before) < 1e-6
        assert relative_error(model(ids).logits, adapted) < 1e-5
        merged = model.merge_and_unload()
        assert relative_error(merged(ids).logits, adapted) < 1e-5
        assert not any("lora" in n for n, _ in merged.named_parameters())
        base = _peft_model(model_dir).unload()
        plain = auto_class(model_type).from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        assert relative_error(base(ids).logits, plain(ids).logits) < 1e-6
        assert not any("lora" in n for n, _ in base.named_parameters())


@pytest.mark.parametrize("targets", ["default", "experts"])
@pytest.mark.filterwarnings("ignore:Adapter cannot be set when the model is merged:UserWarning")  # peft, as expected
@pytest.mark.filterwarnings("ignore:Adapter default was active which is now deleted:UserWarning")
def test_switching_or_disabling_while_merged_unmerges_first(targets, checkpoint):
    """As peft does for its layers: set_adapter, disable_adapter and delete_adapter take a merged adapter out of the
    experts' weights first, so the weights come back exactly and no adapter is applied twice; deleting the active
    adapter leaves the first one active and trainable, peft's layers and the experts alike."""
    kwargs = {} if targets == "default" else dict(target_modules=("gate_up_proj", "down_proj"))
    model_dir = checkpoint("qwen3_moe")
    model = _peft_model(model_dir, **kwargs)
    experts = next(m for m in model.modules() if hasattr(m, "lora_A_gate_up"))
    weights = experts.gate_up_proj.detach().clone()
    ids = token_batch()
    with torch.no_grad():
        adapted = model(ids).logits
        base = auto_class("qwen3_moe").from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)(ids).logits
        model.merge_adapter()
        with model.disable_adapter():
            assert relative_error(model(ids).logits, base) < 1e-6
        model.merge_adapter()
        _trl_reference_copy(model, "other")
        model.set_adapter("other")  # unmerges "default" first
        assert relative_error(experts.gate_up_proj, weights) < 1e-6
        model.set_adapter("default")
        assert relative_error(model(ids).logits, adapted) < 1e-5
    model.delete_adapter("default")
    assert model.active_adapter == "other" and model.base_model.active_adapters == ["other"]
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    with torch.no_grad():
        assert relative_error(model(ids).logits, adapted) < 1e-5  # "other" is a copy of "default"



def test_merge_refuses_a_full_out_dir_a_missing_adapter_file_and_an_adapter_of_another_model(checkpoint, tmp_path):
    """Each in one line naming the argument; the first two before anything loads."""
    import shutil

    qwen, mixtral = checkpoint("qwen3_moe"), checkpoint("mixtral")
    model, _ = FastMoEModel.from_pretrained(qwen, dtype=torch.float32)
    FastMoEModel.get_peft_model(model, r=2, target_modules=["q_proj", "gate_up_proj"]).save_pretrained(tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match=r"^out_dir: .* exists and is not empty"):
        moetune.merge(qwen, str(tmp_path / "a"), str(tmp_path / "full"))
    shutil.copytree(tmp_path / "a", tmp_path / "config_only")
    (tmp_path / "config_only" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"^adapter_dir: no adapter_model.safetensors in"):
        moetune.merge(qwen, str(tmp_path / "config_only"), str(tmp_path / "m1"))
    with pytest.raises(ValueError, match=r"^dtype: expected a torch floating dtype or one of 'auto'.*got 'bf16'"):
        moetune.merge(qwen, str(tmp_path / "a"), str(tmp_path / "m2"), dtype="bf16")
    with pytest.raises(ValueError, match=r"^adapter_dir: .* does not fit .* \(size mismatch for "):
        moetune.merge(mixtral, str(tmp_path / "a"), str(tmp_path / "m3"))
    assert not any(p.name.startswith(("m1", "m2", "m3", ".moetune-merge")) for p in tmp_path.iterdir())


def test_a_second_get_peft_model_on_one_model_is_refused(checkpoint):
    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    FastMoEModel.get_peft_model(model, r=4, target_modules=["q_proj", "gate_up_proj"])
    with pytest.raises(ValueError, match=r"^model: it already has LoRA from an earlier get_peft_model"):
        FastMoEModel.get_peft_model(model, r=8, target_modules=["q_proj", "gate_up_proj"])
    fresh, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    FastMoEModel.get_peft_model(fresh, r=4, target_modules=["gate_up_proj"])  # expert LoRA only: refused too
    with pytest.raises(ValueError, match=r"^model: it already has LoRA"):
        FastMoEModel.get_peft_model(fresh, r=4, target_modules=["gate_up_proj"])


def test_from_pretrained_names_a_bad_dtype_and_a_model_passed_as_its_source(checkpoint):
    with pytest.raises(ValueError, match=r"^dtype: expected a torch floating dtype .*got 'bf16'"):
        FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype="bf16")
    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    with pytest.raises(ValueError) as err:
        FastMoEModel.from_pretrained(model)
    assert str(err.value).endswith("got Qwen3MoeForCausalLM") and "\n" not in str(err.value)


def test_merge_into_an_out_dir_spelled_with_a_trailing_slash(checkpoint, tmp_path):
    model_dir = checkpoint("qwen3_moe")
    _peft_model(model_dir).save_pretrained(tmp_path / "adapter")
    moetune.merge(model_dir, str(tmp_path / "adapter"), str(tmp_path / "merged") + "/")
    assert (tmp_path / "merged" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temp dir left, none inside


def test_merge_refuses_an_adapter_of_more_or_fewer_layers(checkpoint, tmp_path):
    """peft would load what fits and leave the rest: a layer's LoRA silently dropped, or a layer merged unchanged."""
    config = tiny_config("qwen3_moe")
    for layers in (2, 3):
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        auto_class("qwen3_moe").from_config(config).save_pretrained(tmp_path / f"base{layers}")
        model, _ = FastMoEModel.from_pretrained(str(tmp_path / f"base{layers}"), dtype=torch.float32)
        FastMoEModel.get_peft_model(model, r=2, use_gradient_checkpointing=False).save_pretrained(
            tmp_path / f"adapter{layers}")
    with pytest.raises(ValueError, match=r"^adapter_dir: .* holds LoRA weights for modules .* does not have, e\.g\. "
                                         r"base_model\.model\.model\.layers\.2\."):
        moetune.merge(str(tmp_path / "base2"), str(tmp_path / "adapter3"), str(tmp_path / "m1"))
    with pytest.raises(ValueError, match=r"^adapter_dir: .* has no LoRA weights for modules it targets in .*, e\.g\. "
                                         r"base_model\.model\.model\.layers\.2\."):
        moetune.merge(str(tmp_path / "base3"), str(tmp_path / "adapter2"), str(tmp_path / "m2"))
    assert not any(p.name.startswith(("m1", "m2", ".tmp")) for p in tmp_path.iterdir())


def test_merge_names_the_directory_it_cannot_read(checkpoint, tmp_path):
    import shutil

    model_dir = checkpoint("qwen3_moe")
    _peft_model(model_dir).save_pretrained(tmp_path / "adapter")
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.copytree(tmp_path / "adapter", tmp_path / "cut")
    (tmp_path / "cut" / "adapter_model.safetensors").write_bytes(weights[:100])
    with pytest.raises(ValueError, match=r"^adapter_dir: cannot read the weights in .*cut \("):
        moetune.merge(model_dir, str(tmp_path / "cut"), str(tmp_path / "m1"))
    shutil.copytree(tmp_path / "adapter", tmp_path / "bad_json")
    (tmp_path / "bad_json" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^adapter_dir: cannot read adapter_config.json in .*bad_json: "):
        moetune.merge(model_dir, str(tmp_path / "bad_json"), str(tmp_path / "m2"))
    with pytest.raises(ValueError, match=r"^model_dir: no transformers model config in .*adapter \("):
        moetune.merge(str(tmp_path / "adapter"), str(tmp_path / "adapter"), str(tmp_path / "m3"))
    assert not any(p.name.startswith(("m1", "m2", "m3", ".tmp")) for p in tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5.2x
def test_merge_refuses_an_adapter_that_ties_its_embedding_lora(tmp_path):
    """peft's ensure_weight_tying: one LoRA for the tied embedding and lm_head. peft's own merge folds it into the
    shared weight twice (the merged model's logits are not the adapter model's), and untying first leaves its lm_head
    factors without a module: refused in one line, before anything is written."""
    from peft import LoraConfig, get_peft_model

    config = tiny_config("qwen3_moe")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    auto_class("qwen3_moe").from_config(config).save_pretrained(tmp_path / "base")
    base = auto_class("qwen3_moe").from_pretrained(tmp_path / "base", dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True)
                   ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"^adapter_dir: .* ties its LoRA on the tied embedding and lm_head"):
        moetune.merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
