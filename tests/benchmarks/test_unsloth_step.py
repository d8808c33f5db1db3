"""benchmarks/unsloth_step.py where there is neither Unsloth nor a GPU: its arguments, the checkpoint
it makes (through the same child process it starts before importing Unsloth), and the LoRA
parameter count it checks Unsloth's against. The Unsloth run itself needs the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "unsloth_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("unsloth_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unsloth_step = _load()


def test_help_does_not_import_unsloth():
    # sys.modules["unsloth"] = None makes any `import unsloth` fail, installed or not.
    code = (
        "import runpy, sys; sys.modules['unsloth'] = None; sys.modules['unsloth_zoo'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, '--help']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--checkpoint" in proc.stdout and "--seq" in proc.stdout


def test_arguments():
    args = unsloth_step.parse_args(["--checkpoint", "/tmp/x", "--seq", "4096", "8192", "16384", "32768"])
    assert args.seq == [4096, 8192, 16384, 32768]
    assert (args.rank, args.alpha, args.warmup, args.steps) == (16, 32, 3, 10)  # train_step.py's defaults
    assert (args.model, args.layers, args.targets, args.out) == ("qwen3-30b-a3b", 8, "notebook", None)
    assert not args.tiny and not args.create_only
    with pytest.raises(SystemExit):
        unsloth_step.parse_args(["--seq", "4096"])  # --checkpoint is required
    with pytest.raises(SystemExit):
        unsloth_step.parse_args(["--checkpoint", "/tmp/x", "--targets", "all"])


def test_expected_count_is_the_issues_107m():
    import train_step

    config = train_step.make_config("qwen3-30b-a3b", 8).to_dict()
    assert unsloth_step.expected_trainable_params(config, 16) == 107_085_824


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint made the way main() makes a missing one: ensure_checkpoint's child process."""
    path = tmp_path_factory.mktemp("unsloth") / "qwen3-tiny-x2"
    args = unsloth_step.parse_args(["--checkpoint", str(path), "--tiny", "--layers", "2"])
    assert unsloth_step.ensure_checkpoint(args) == 0
    return path


def test_checkpoint_loads_with_transformers(checkpoint):
    import train_step
    import transformers

    assert not Path(str(checkpoint) + ".partial").exists()
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("qwen3_moe", 2, 512)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    fresh = transformers.AutoModelForCausalLM.from_config(train_step.make_config("qwen3-30b-a3b", 2, tiny=True))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    weights = model.model.layers[1].mlp.experts.gate_up_proj
    assert weights.abs().sum() > 0 and torch.isfinite(weights).all()  # random weights, read back

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.eos_token_id == config["eos_token_id"] and tokenizer.pad_token_id == config["pad_token_id"]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert max(tokenizer("w0 w7 w60")["input_ids"]) < len(tokenizer) <= config["vocab_size"]


def test_existing_checkpoint_is_kept(checkpoint):
    stamp = os.stat(checkpoint / "model.safetensors").st_mtime_ns
    assert unsloth_step.ensure_checkpoint(unsloth_step.parse_args(["--checkpoint", str(checkpoint), "--tiny"])) == 0
    assert os.stat(checkpoint / "model.safetensors").st_mtime_ns == stamp


def test_tokenizer_added_to_a_checkpoint_without_one(tmp_path):
    """A checkpoint train_step.py --checkpoint saved (weights only) gets the tokenizer Unsloth's loader needs."""
    import train_step
    import transformers

    path = tmp_path / "weights-only"
    config = train_step.make_config("qwen3-30b-a3b", 1, tiny=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    assert not unsloth_step.has_tokenizer(str(path))
    assert unsloth_step.ensure_checkpoint(unsloth_step.parse_args(["--checkpoint", str(path), "--tiny"])) == 0
    assert unsloth_step.has_tokenizer(str(path))
    assert os.stat(path / "model.safetensors").st_mtime_ns == stamp
    assert transformers.AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"


def test_lora_count_and_targets_match_peft(checkpoint):
    """The arithmetic Unsloth's count is checked against equals PEFT's own at r=16 on q/k/v/o + experts."""
    import transformers
    from peft import LoraConfig, inject_adapter_in_model

    config = json.loads((checkpoint / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=unsloth_step.TARGET_MODULES[:4],
                      target_parameters=unsloth_step.EXPERT_PARAMETERS)
    model = inject_adapter_in_model(lora, model)  # get_peft_model warns under transformers 5.23
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == unsloth_step.expected_trainable_params(config, 16) == 71_680
    assert unsloth_step.lora_targets(model) == [
        "mlp.experts", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_full_size_checkpoint_refused_without_gpu(tmp_path):
    # main() stops at the child's refusal, before it would import Unsloth.
    assert unsloth_step.main(["--checkpoint", str(tmp_path / "x")]) == 2
    assert unsloth_step.main(["--checkpoint", str(tmp_path / "x"), "--create-only"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
