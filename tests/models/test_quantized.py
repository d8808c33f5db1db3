"""Checkpoints whose experts ship quantized: gpt-oss's MXFP4, loaded dequantized; and strict loads, which refuse a
checkpoint missing weights (moetune/models/quantized.py)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from moetune import FastMoEModel
from moetune.adapters import merge
from moetune.models.quantized import MissingWeights, from_pretrained_dequantized

from .helpers import auto_class, save_checkpoint, tiny_tokenizer
from .tiny import tiny_config

# E2M1's sixteen values, in code order (the low nibble of a block byte is the even element).
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., K] in groups of 32 along K -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8 as E8M0,
    the values they stand for)."""
    groups = w.reshape(*w.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    codes = (groups / torch.exp2(exponent)[..., None]).unsqueeze(-1).sub(FP4).abs().argmin(-1)
    values = (FP4[codes] * torch.exp2(exponent)[..., None]).reshape(w.shape)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (exponent + 127).to(torch.uint8), values


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """(an MXFP4 gpt-oss checkpoint laid out as openai/gpt-oss-20b ships, a plain one of the weights it stands for)."""
    root = tmp_path_factory.mktemp("mxfp4")
    config = tiny_config("gpt_oss")
    config.intermediate_size = 32  # MXFP4 groups of 32 along the hidden and intermediate sizes
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).float()
    state, quantized = {k: v.clone() for k, v in model.state_dict().items()}, {}
    for key, value in state.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # stored [E, in, out]; the checkpoint holds [E, out, in/32, 16] blocks
            blocks, scales, values = mxfp4(value.transpose(1, 2).contiguous())
            quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
            state[key] = values.transpose(1, 2).contiguous()
        else:
            quantized[key] = value.to(torch.bfloat16)
            state[key] = quantized[key].float()
    model.load_state_dict(state)
    plain, packed = str(root / "plain"), str(root / "mxfp4")
    model.save_pretrained(plain)
    tiny_tokenizer().save_pretrained(plain)
    os.makedirs(packed)
    for name in os.listdir(plain):
        if not name.endswith(".safetensors"):
            with open(os.path.join(plain, name), "rb") as src, open(os.path.join(packed, name), "wb") as dst:
                dst.write(src.read())
    save_file(quantized, os.path.join(packed, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(packed, "config.json")) as f:
        saved = json.load(f)
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(packed, "config.json"), "w") as f:
        json.dump(saved, f)
    return packed, plain


def test_mxfp4_experts_load_dequantized_and_compute_as_their_values(mxfp4_checkpoint):
    packed, plain = mxfp4_checkpoint
    model, _ = FastMoEModel.from_pretrained(packed, dtype=torch.float32)
    reference, _ = FastMoEModel.from_pretrained(plain, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 9))
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    peft_model = FastMoEModel.get_peft_model(model, r=2, target_modules=["gate_up_proj"])
    peft_model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("checkpoint", ["mxfp4_checkpoint", "fp8_checkpoint"])
def test_an_adapter_merges_into_a_quantized_checkpoint_as_a_plain_one(checkpoint, request, tmp_path):
    """The merged checkpoint holds the dequantized weights with the LoRA folded in, in a plain layout
    transformers reloads (5.17-5.23 wrote the experts under names lost on reload, or failed, for FP8)."""
    packed, _ = request.getfixturevalue(checkpoint)
    model, _ = FastMoEModel.from_pretrained(packed, dtype=torch.float32)
    peft_model = FastMoEModel.get_peft_model(model, r=2, target_modules=["q_proj", "gate_up_proj"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge(packed, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    with open(tmp_path / "merged" / "config.json") as f:
        assert "quantization_config" not in json.load(f)  # the weights written are the dequantized ones
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                               local_files_only=True)
    ids = torch.randint(0, 64, (1, 7))
    peft_model.eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_kept_mxfp4_experts_are_named_in_the_error(mxfp4_checkpoint, monkeypatch):
    """A caller's own quantization_config wins; where transformers keeps the experts quantized (its Hub kernels),
    moetune says so in one line instead of finding no experts."""
    from moetune.models import hook

    class Packed(torch.nn.Module):  # the parameters transformers' MXFP4 experts hold
        def __init__(self):
            super().__init__()
            self.gate_up_proj_blocks = torch.nn.Parameter(torch.zeros(2, 4, 1, 16, dtype=torch.uint8), requires_grad=False)

    model = torch.nn.Module()
    model.experts = Packed()
    spec = type("Spec", (), {"experts_module": "mlp.experts", "model_type": "gpt_oss"})()
    with pytest.raises(ValueError, match=r"^model: its experts are MXFP4-quantized .*Mxfp4Config\(dequantize=True\)"):
        hook.find_experts(model, spec)


def fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn weight, weight_scale_inv [N/block, K/block] fp32, the values they stand for), as
    DeepSeek-V3 and Qwen3-*-FP8 ship them: each block scaled so its largest magnitude is 448."""
    n, k = w.shape
    tiles = w.reshape(n // block, block, k // block, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    values = (q.float() * scale[:, None, :, None]).reshape(n, k)
    return q.reshape(n, k), scale, values


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(a fine-grained FP8 Qwen3-MoE checkpoint in the layout Qwen3-30B-A3B-FP8 ships, a plain one of its values)."""
    root = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(tiny_config("qwen3_moe")).float()
    model.save_pretrained(root / "source")
    from safetensors.torch import load_file

    state = load_file(str(root / "source" / "model.safetensors"))
    quantized, plain = {}, {}
    for key, value in state.items():
        if value.dim() == 2 and key.endswith("proj.weight"):  # attention, dense MLP, each expert (not the router)
            q, scale, values = fp8_blocks(value, 8)
            quantized[key], quantized[key + "_scale_inv"], plain[key] = q, scale, values
        else:
            quantized[key] = plain[key] = value
    packed, reference = root / "fp8", root / "plain"
    for path, tensors in ((packed, quantized), (reference, plain)):
        os.makedirs(path)
        for name in os.listdir(root / "source"):
            if not name.endswith(".safetensors"):
                (path / name).write_bytes((root / "source" / name).read_bytes())
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    saved = json.loads((packed / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                    "weight_block_size": [8, 8], "modules_to_not_convert": ["lm_head", "mlp.gate"]}
    (packed / "config.json").write_text(json.dumps(saved))
    return str(packed), str(reference)


def test_dequantization_is_asked_for_fp8_checkpoints_keeping_their_settings(fp8_checkpoint):
    from moetune.models.quantized import dequantizing_kwargs

    config = transformers.AutoConfig.from_pretrained(fp8_checkpoint[0], local_files_only=True)
    asked = dequantizing_kwargs(config, {"revision": "x"})["quantization_config"]
    assert isinstance(asked, transformers.FineGrainedFP8Config) and asked.dequantize
    assert asked.modules_to_not_convert == ["lm_head", "mlp.gate"]
    own = transformers.FineGrainedFP8Config()
    assert dequantizing_kwargs(config, {"quantization_config": own})["quantization_config"] is own  # the caller's wins
    # A config object (a loaded model's) carries the method as an enum, not a string.
    config.quantization_config = transformers.FineGrainedFP8Config(modules_to_not_convert=["lm_head"])
    assert dequantizing_kwargs(config, {})["quantization_config"].dequantize


@pytest.mark.parametrize("checkpoint", ["mxfp4_checkpoint", "fp8_checkpoint"])
@pytest.mark.parametrize("own", [False, True])
def test_dequantized_checkpoints_are_plain_however_dequantization_was_asked(checkpoint, own, request, tmp_path):
    """moetune's request or the caller's own dequantizing config (as moetune's errors suggest): experts in the
    model's dtype (transformers 5.17-5.22 gave MXFP4 ones bf16) and save_pretrained writing a plain layout that
    reloads equal (5.17-5.23 wrote the experts under names lost on reload, or failed for FP8)."""
    packed, _ = request.getfixturevalue(checkpoint)
    kwargs = {}
    if own:
        kwargs["quantization_config"] = (transformers.Mxfp4Config(dequantize=True) if checkpoint.startswith("mxfp4")
                                         else transformers.FineGrainedFP8Config(dequantize=True))
    model, _ = FastMoEModel.from_pretrained(packed, dtype=torch.float32, **kwargs)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float32
    model.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32,
                                                              local_files_only=True)
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_checkpoints_load_dequantized_and_compute_as_their_values(fp8_checkpoint, device):
    """On an sm89+ GPU transformers would keep FP8Experts (weights moetune's GEMMs do not read); dequantized there
    too. On CPU transformers dequantizes anyway: the layout and the values are checked."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    packed, reference = fp8_checkpoint
    model, _ = FastMoEModel.from_pretrained(packed, dtype=torch.float32, device_map=device)
    plain, _ = FastMoEModel.from_pretrained(reference, dtype=torch.float32, device_map=device)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.dim() == 3
    ids = torch.randint(0, 96, (2, 9), device=device)
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    peft_model = FastMoEModel.get_peft_model(model, r=2, target_modules=["q_proj", "gate_up_proj"])
    peft_model(input_ids=ids, labels=ids).loss.backward()


def test_kept_fp8_experts_are_named_in_the_error():
    from moetune.models import hook

    class Kept(torch.nn.Module):  # transformers' FP8Experts holds float8 stacks
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 4, 8, dtype=torch.float8_e4m3fn), requires_grad=False)

    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = Kept()
    spec = type("Spec", (), {"experts_module": "mlp.experts", "model_type": "qwen3_moe"})()
    with pytest.raises(ValueError, match=r"^model: its experts are FP8-quantized \(mlp.experts.gate_up_proj is "
                                         r"torch.float8_e4m3fn\); .*FineGrainedFP8Config\(dequantize=True\)"):
        hook.find_experts(model, spec)


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """What transformers' loggers pass to their handlers during the test."""
    handler, logger = _Messages(), logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _edited_checkpoint(tmp_path, edit) -> str:
    from safetensors.torch import load_file

    path = save_checkpoint("qwen3_moe", str(tmp_path / "edited"), tokenizer=False)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def _load_strict(path: str):
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return from_pretrained_dequantized(auto_class("qwen3_moe"), path, config, strict=True, dtype=torch.float32,
                                       local_files_only=True)


def test_a_checkpoint_missing_weights_is_refused_without_transformers_load_report(tmp_path, transformers_log):
    path = _edited_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(MissingWeights, match=r"lacks 1 of the model's weights \(model.layers.1.self_attn.q_proj"):
        _load_strict(path)
    assert not any("LOAD REPORT" in message for message in transformers_log), transformers_log
    assert transformers.logging.get_logger("transformers.modeling_utils").filters == []


def test_a_loaded_checkpoint_still_shows_transformers_load_report(tmp_path, transformers_log):
    def add_unexpected(tensors):
        tensors["model.layers.0.unused.weight"] = torch.zeros(2)

    _load_strict(_edited_checkpoint(tmp_path, add_unexpected))
    reports = [message for message in transformers_log if "LOAD REPORT" in message]
    assert len(reports) == 1 and "model.layers.0.unused.weight" in reports[0], transformers_log
    assert transformers.logging.get_logger("transformers.modeling_utils").filters == []
