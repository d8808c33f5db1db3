"""Bad input to `moetune train` / `merge`: exit code 2, one line on stderr naming the problem, no traceback,
and nothing written that looks like a run."""

from __future__ import annotations

import json
import os

import pytest

from ..models.helpers import save_checkpoint
from .helpers import DEMO_RECORD, run_cli, run_subprocess, write_jsonl

GOOD = [DEMO_RECORD] * 3


def _llama_dir(tmp_path) -> str:
    path = tmp_path / "llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return str(path)


def _broken_weights_dir(tmp_path) -> str:
    path = save_checkpoint("qwen3_moe", str(tmp_path / "broken"))
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    return path


def _partial_weights_dir(tmp_path) -> str:
    """A checkpoint that lost one tensor (a partial copy or download): transformers would start it at random."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint("qwen3_moe", str(tmp_path / "partial"))
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def _config_changed_dir(tmp_path, **changes) -> str:
    """The tiny Qwen3-MoE with its config.json edited."""
    path = save_checkpoint("qwen3_moe", str(tmp_path / "edited"))
    config = json.loads(open(os.path.join(path, "config.json")).read())
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, **changes}, f)
    return path


def _data(tmp_path, records=(), raw=(), name="d.jsonl") -> str:
    return write_jsonl(tmp_path / name, records, raw)


# Each case: (builder of extra arguments from tmp_path, text the one-line message must contain).
CASES = {
    "missing data file": (lambda t: ["--data", t / "nope.jsonl"], "--data: no such file"),
    "data is a directory": (lambda t: ["--data", t], "is a directory; expected a JSONL file"),
    "not utf-8": (lambda t: ["--data", _binary(t)], "line 3: not UTF-8 text (byte 0xe9 at column 14)"),
    "lone surrogate": (lambda t: ["--data", _data(t, raw=['{"text": "a truncated emoji \\ud83d"}'])],
                       "line 1: a string holds a lone UTF-16 surrogate (\\ud83d), which is no text"),
    "two formats in one record": (lambda t: ["--data", _data(t, [{"text": "a", "messages": GOOD[0]["messages"]}])],
                                  "line 1: has the fields of more than one format (text, messages); keep one"),
    "two formats in a later record": (lambda t: ["--data", _data(t, [*GOOD, {**GOOD[0], "text": "a"}])],
                                      "line 4: has the fields of more than one format (text, messages); keep one"),
    "malformed json line": (lambda t: ["--data", _data(t, GOOD, ['{"messages": [']) ], "line 4: not valid JSON"),
    "json array line": (lambda t: ["--data", _data(t, GOOD, ["[1, 2]"])], "line 4: expected a JSON object"),
    "unknown format": (lambda t: ["--data", _data(t, [{"prompt": "a", "completion": "b"}])], "line 1: expected a record with"),
    "missing field": (lambda t: ["--data", _data(t, [*GOOD, {"text": "x"}])], "line 4: missing field 'messages'"),
    "message without content": (lambda t: ["--data", _data(t, [{"messages": [{"role": "user"}]}])], "line 1: messages[0] needs"),
    "no assistant turn": (lambda t: ["--data", _data(t, [{"messages": [{"role": "user", "content": "hi"}]}])], "no \"assistant\" message"),
    "empty output": (lambda t: ["--data", _data(t, [{"instruction": "a", "output": ""}])], "\"output\" is empty"),
    "text not a string": (lambda t: ["--data", _data(t, [{"text": 5}])], "\"text\" must be a non-empty string"),
    "empty dataset": (lambda t: ["--data", _data(t, raw=["", "  "])], "holds no records (empty dataset)"),
    "record too long": (lambda t: ["--data", _data(t, GOOD), "--max-seq-length", "8"], "line 1: 22 tokens, longer than --max-seq-length 8"),
    "longer than the model": (lambda t: ["--max-seq-length", "100000"], "longer than the model allows (512 positions)"),
    "missing model dir": (lambda t: ["--model", t / "none"], "--model: no such directory"),
    "no config.json": (lambda t: ["--model", t], "has no config.json"),
    "non-MoE model": (lambda t: ["--model", _llama_dir(t)], "is a 'llama' model, not a supported MoE architecture"),
    "config field of the wrong type": (lambda t: ["--model", _config_changed_dir(t, hidden_size="big")], "Validation error for field 'hidden_size': TypeError: Field 'hidden_size' expected int, got str (value: 'big')"),
    "top-k past the experts": (lambda t: ["--model", _config_changed_dir(t, num_experts_per_tok=16)], "config sets num_experts_per_tok 16; expected an integer from 1 to its 6 experts"),
    "top-k of zero": (lambda t: ["--model", _config_changed_dir(t, num_experts_per_tok=0)], "config sets num_experts_per_tok 0; expected an integer from 1 to its 6 experts"),
    "empty config path": (lambda t: ["--config", ""], "--config: expected a path to a .yaml, .yml or .toml file, got ''"),
    "broken weights": (lambda t: ["--model", _broken_weights_dir(t), "--data", _data(t, [{"text": "the router"}]), "--max-seq-length", "64"], "cannot load the weights"),
    "weights missing from the checkpoint": (lambda t: ["--model", _partial_weights_dir(t), "--data", _data(t, [{"text": "the router"}]), "--max-seq-length", "64"], "lacks 1 of the model's weights (model.layers.1.self_attn.q_proj.weight), which would start at random values"),
    "missing config file": (lambda t: ["--config", t / "x.yaml"], "--config: cannot read"),
    "bad config key": (lambda t: ["--config", _yaml(t, "learning_rate: 1\n")], "unknown key 'learning_rate'"),
    "bad flag value": (lambda t: ["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    "flag type": (lambda t: ["--max-steps", "three"], "argument --max-steps: invalid int value"),
    "negative checkpoint layers": (lambda t: ["--checkpoint-layers", "-1"], "--checkpoint-layers: expected an integer >= 0"),
    "checkpoint layers neither number nor auto": (lambda t: ["--checkpoint-layers", "most"], "argument --checkpoint-layers: expected an integer, auto or all, got 'most'"),
    "more checkpoint layers than the model": (lambda t: ["--checkpoint-layers", "9"], "--checkpoint-layers: expected at most the model's 4 decoder layers, got 9"),
    "memory cap not positive": (lambda t: ["--max-memory", "0"], "--max-memory: expected a number of GiB > 0, got 0.0"),
    "memory cap without the auto plan": (lambda t: ["--max-memory", "40", "--checkpoint-layers", "all"], "--max-memory: applies to --checkpoint-layers auto with gradient checkpointing on, got --checkpoint-layers all"),
    "memory cap without checkpointing": (lambda t: ["--max-memory", "40", "--no-gradient-checkpointing"], "--max-memory: applies to --checkpoint-layers auto with gradient checkpointing on, got --no-gradient-checkpointing"),
    "clipping norm negative": (lambda t: ["--max-grad-norm", "-1"], "--max-grad-norm: expected a number >= 0 (0: no clipping), got -1.0"),
    "step in backward with clipping": (lambda t: ["--step-in-backward"], "--step-in-backward: needs --max-grad-norm 0 and --grad-accum 1 (clipping and accumulation need every gradient at once), got --max-grad-norm 1.0 --grad-accum 1"),
    "step in backward with accumulation": (lambda t: ["--step-in-backward", "--max-grad-norm", "0", "--grad-accum", "2"], "--step-in-backward: needs --max-grad-norm 0 and --grad-accum 1 (clipping and accumulation need every gradient at once), got --max-grad-norm 0.0 --grad-accum 2"),
    "memory cap not a number": (lambda t: ["--max-memory", "lots"], "argument --max-memory: invalid float value: 'lots'"),
    "no kept attention without the auto plan": (lambda t: ["--no-keep-attention", "--checkpoint-layers", "2"], "--no-keep-attention: applies to --checkpoint-layers auto with gradient checkpointing on, got --checkpoint-layers 2"),
    "resume nothing": (lambda t: ["--resume"], "--resume: no checkpoint"),
    "bad target module": (lambda t: ["--target-modules", "nonsense"], "error: --target-modules: expected names from"),
    "unknown optimizer": (lambda t: ["--optim", "sgd"], "argument --optim: invalid choice"),
    "8-bit optimizer on the CPU": (lambda t: ["--optim", "adamw_8bit", "--device", "cpu"], "--optim: adamw_8bit runs on a CUDA GPU"),
    "bf16-state AdamW with bf16 routers trained": (lambda t: ["--optim", "adamw_bf16", "--train-router", "--dtype", "bfloat16"], "--optim: adamw_bf16 steps float32 weights, and --train-router trains the routers in the model's bfloat16; use --optim adamw, or --dtype float32"),
    "epochs not finite": (lambda t: ["--epochs", "inf"], "--epochs: expected a finite number > 0, got inf"),
    "learning rate not finite": (lambda t: ["--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
    "weight decay not a number": (lambda t: ["--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0, got nan"),
    "seed past 64 bits": (lambda t: ["--seed", str(2**63)], "--seed: expected an integer in [-2**63, 2**63)"),
    "output dir below a file": (lambda t: ["--output-dir", _file(t) / "run"], "is not a directory"),
    "yaml value of the wrong type": (lambda t: ["--config", _yaml(t, "lr: fast\n")], "--config: "),
    "tokenizer past the model's vocabulary": (lambda t: ["--model", _demo_tokenizer_on_tiny_model(t), "--data", _data(t, [{"text": "the router picks experts"}]), "--max-seq-length", "64"], "past the model's vocabulary of 96 ids"),
}


def _file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    return path


def _demo_tokenizer_on_tiny_model(tmp_path) -> str:
    """The tiny Qwen3-MoE (96 ids) with the demo's tokenizer (595 ids): a mismatched pair."""
    import shutil

    import moetune

    path = save_checkpoint("qwen3_moe", str(tmp_path / "mismatched"), tokenizer=False)
    demo = os.path.join(os.path.dirname(moetune.__file__), "demo")
    for name in os.listdir(demo):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(demo, name), path)
    return path


def _binary(tmp_path) -> str:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9 latin-1"}\n')
    return str(path)


def _yaml(tmp_path, text) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, case):
    build, message = CASES[case]
    out = tmp_path / "out"
    extra = build(tmp_path)
    capsys.readouterr()  # drop what building the inputs printed (checkpoint save progress)
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", out, *extra)
    assert code == 2, stderr
    assert message in stderr, stderr
    assert stderr.startswith("moetune train: error:") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and stdout == ""
    # Nothing that looks like a run: at most an empty output directory.
    assert not out.exists() or os.listdir(out) == []


def test_existing_run_is_not_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out)
    assert code == 2 and "already holds a run (summary.json)" in stderr
    assert os.listdir(out) == ["summary.json"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("train",), {"MOETUNE_MOE_BACKEND": "fastest"}, "MOETUNE_MOE_BACKEND: expected one of native, grouped_mm, triton"),
        (("train", "--data", "/no/such.jsonl"), {}, "--data: no such file: /no/such.jsonl"),
        (("merge", "/no/model", "/no/adapter", "out"), {}, "model_dir: expected a local checkpoint directory"),
        (("train", "--lr"), {}, "argument --lr: expected one argument"),
    ],
)
def test_real_entry_point_errors(tmp_path, args, env, message):
    proc = run_subprocess(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert os.listdir(tmp_path) == []


def test_a_gpu_index_this_machine_lacks(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", out, "--device", "cuda:3")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "--device: expected a device this machine has, got cuda:3 but it has 1 CUDA device(s)" in stderr
    assert not out.exists() or os.listdir(out) == []
    code, _, stderr = run_cli(capsys, "info", "--device", "cuda:1")
    assert code == 2 and "--device: expected a device this machine has, got cuda:1 but it has 1" in stderr, stderr


@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_merge_refuses_missing_weights_and_names_what_it_cannot_write(tmp_path, capsys):
    """merge loads as train does (a checkpoint missing a weight would merge onto random values), a place it cannot
    write is named as out_dir, not blamed on the reading, and a config.json with a field of the wrong type is named
    too. (transformers' loading bar may come before the error line: it is on unless a train ran in this process.)"""
    import torch

    from moetune import FastMoEModel

    model, _ = FastMoEModel.from_pretrained(save_checkpoint("qwen3_moe", str(tmp_path / "whole")), dtype=torch.float32)
    FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False).save_pretrained(
        tmp_path / "adapter")
    partial, unwritable = _partial_weights_dir(tmp_path), _file(tmp_path) / "m"
    typed = _config_changed_dir(tmp_path, hidden_size="big")
    capsys.readouterr()

    def error_of(*args):
        code, _, stderr = run_cli(capsys, "merge", *args)
        assert code == 2 and stderr.count("error:") == 1 and "Traceback" not in stderr, stderr
        return stderr.strip().splitlines()[-1]

    error = error_of(partial, tmp_path / "adapter", tmp_path / "m")
    assert error.startswith("moetune merge: error: model_dir: ") and "lacks 1 of the model's weights" in error
    assert not (tmp_path / "m").exists()
    error = error_of(tmp_path / "whole", tmp_path / "adapter", unwritable)
    assert error.startswith(f"moetune merge: error: out_dir: cannot write {unwritable}: ")
    error = error_of(typed, tmp_path / "adapter", tmp_path / "m")
    assert error.startswith("moetune merge: error: model_dir: no transformers model config in ")
    assert "Field 'hidden_size' expected int, got str (value: 'big')" in error and not (tmp_path / "m").exists()


def test_a_failing_write_is_one_line_and_leaves_no_half_written_demo_model(tmp_path, capsys, monkeypatch):
    """The file system failing (full, read-only) is no bad input: one line and exit 1, with what to do next; the
    demo model half-copied into the output is removed, and so is its temporary directory."""
    import tempfile

    import moetune.training.loop as loop

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    real_move = loop.shutil.move

    def full_disk(source, target):
        real_move(source, target)
        os.remove(os.path.join(target, "model.safetensors"))  # the copy got part-way
        raise OSError(28, "No space left on device", os.path.join(target, "model.safetensors"))

    monkeypatch.setattr(loop.shutil, "move", full_disk)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 1)
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("moetune train: error: [Errno 28] No space left on device: ") and \
        stderr.rstrip().endswith("; nothing was written"), stderr
    assert os.listdir(out) == [] and os.listdir(tmp_path / "tmp") == []


def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path, capsys, monkeypatch):
    import moetune.training.config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moetune.training.config, "resolve_config", interrupted)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out")
    assert code == 130 and stderr == "moetune train: interrupted\n"


def test_a_warning_is_one_line_that_names_the_command(tmp_path):
    """DeepSeek-V3's dense first layer has a Linear down_proj, which peft would read as the experts' weight: the
    warning saying so is one line, not Python's file, line and source."""
    model = save_checkpoint("deepseek_v3", str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the router picks experts"}] * 4)
    proc = run_subprocess("train", "--model", model, "--data", data, "--max-steps", 1, "--max-seq-length", 64,
                          "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "moetune train: warning: target_modules: on deepseek_v3 peft reads down_proj" in proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_under_any_writer_is_one_line(tmp_path, capsys, monkeypatch, writer):
    """A full disk surfaces as safetensors' own error (the adapter) or torch's RuntimeError (the optimizer state),
    not as an OSError: the same one line and exit 1 for both, in train and in merge."""
    from safetensors import SafetensorError

    import moetune.adapters
    import moetune.training.checkpoint

    def full(*args, **kwargs):
        if writer == "safetensors":
            raise SafetensorError("Error while serializing: IoError(Os { code: 27, message: \"File too large\" })")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(moetune.adapters if writer == "safetensors" else moetune.training.checkpoint.torch,
                      "save_file" if writer == "safetensors" else "save", full)
        code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 2, "--save-steps", 1)
    last = stderr.strip().splitlines()[-1]  # (above it: the progress bar)
    assert code == 1 and stderr.count("error") == 1 and "Traceback" not in stderr, stderr
    written = "adapter_model.safetensors" if writer == "safetensors" else "state.pt"
    assert last.startswith("moetune train: error: cannot write ") and written in last, stderr
    assert ("the disk is likely full (" in last and " MiB free; torch: [enforce fail" in last) is (writer != "safetensors")
    assert last.endswith(f"start again with --overwrite --output-dir {out}"), stderr
    assert not (out / "checkpoints").exists() or os.listdir(out / "checkpoints") == []
    if writer == "safetensors":
        code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 2, "--overwrite")
        assert code == 0, stderr
        import transformers.modeling_utils

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # the merged checkpoint's writer
        code, _, stderr = run_cli(capsys, "merge", out / "demo-model", out / "adapter", tmp_path / "m")
        assert code == 2 and stderr.startswith(f"moetune merge: error: out_dir: cannot write {tmp_path / 'm'}: ")
        assert stderr.count("\n") == 1 and not (tmp_path / "m").exists()
