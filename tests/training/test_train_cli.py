"""`moetune train` and `moetune merge` through the real entry point: the demo, data formats, outputs,
checkpoints and resume, config files, merge. Bad input is in test_errors.py."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from ..models.helpers import save_checkpoint, tiny_tokenizer
from .helpers import metrics, run_cli, run_subprocess, summary, write_jsonl


def test_default_demo_run_within_budget(tmp_path):
    """`moetune train`, no arguments, in a fresh interpreter: the issue's 3-minute acceptance run."""
    start = time.perf_counter()
    proc = run_subprocess("train", cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert seconds < 180, f"default run took {seconds:.0f} s"
    out = tmp_path / "moetune-output"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "expert_load.png", "summary.json"):
        assert (out / name).is_file(), name
    assert "train" in proc.stderr and "tok/s" in proc.stderr and "ETA" in proc.stderr  # the progress bar
    assert "Traceback" not in proc.stderr
    rows = metrics(out)
    assert {"step", "loss", "lr", "tokens_per_s", "peak_memory_gib", "expert_load"} <= set(rows[0])
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    first, last = sum(r["loss"] for r in rows[:10]) / 10, sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.6 * first, (first, last)  # the loss goes down, clearly
    for shares in rows[-1]["expert_load"].values():  # per MoE layer: one share per expert, summing to 1
        assert len(shares) == 8 and abs(sum(shares) - 1) < 1e-9
    assert len(rows[-1]["expert_load"]) == 4
    s = summary(out)
    assert s["data_format"] == "messages" and s["loss_last"] < s["loss_first"]
    # The adapter loads with plain peft onto the demo base model the run wrote.
    from ..models.helpers import plain_peft_model

    model = plain_peft_model(s["base_model_dir"], str(out / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


FORMAT_RECORDS = {
    "text": [{"text": f"the opposite of hot is cold {i}"} for i in range(6)],
    "messages": [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"}, {"role": "assistant", "content": f"{i + 1}."}]} for i in range(6)],
    "instruction": [{"instruction": "Reverse these words:", "input": f"token {i}", "output": f"{i} token"} for i in range(6)],
}


@pytest.mark.parametrize("fmt", list(FORMAT_RECORDS))
def test_each_data_format_trains(tmp_path, capsys, fmt):
    data_path = write_jsonl(tmp_path / "d.jsonl", FORMAT_RECORDS[fmt])
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "train", "--data", data_path, "--output-dir", out, "--max-steps", 3,
                                   "--batch-size", 2, "--save-steps", 2)
    assert code == 0, stderr
    assert "done: 3 steps" in stdout
    assert summary(out)["data_format"] == fmt
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000003"]
    # The adapter names the demo model where it ended up (AutoPeftModel loads it from there), readable as the rest.
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "demo-model").resolve())
    assert (out / "demo-model").stat().st_mode & 0o777 == (out / "adapter").stat().st_mode & 0o777


def test_own_model_directory_packing_and_yaml_config(tmp_path, capsys):
    model_dir = save_checkpoint("qwen3_moe", str(tmp_path / "model"))  # word-level tokenizer, no chat template
    data_path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the router picks two experts for every token"}] * 12)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data_path}\nmax_steps: 2\nbatch_size: 2\npacking: true\n"
                      "max_seq_length: 64\nr: 4\ntarget_modules: [q_proj, gate_up_proj]\nlr: 0.5\n")
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--config", config, "--lr", "0.002", "--output-dir", out)
    assert code == 0, stderr
    rows = metrics(out)
    assert len(rows) == 2 and rows[0]["lr"] < 0.002 + 1e-12  # the flag's lr, not the file's 0.5
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["target_parameters"] == ["mlp.experts.gate_up_proj"]
    # 12 records of 9 tokens (+eos) pack 6 to a 64-token row: 2 rows -> one batch of 2 per step.
    assert summary(out)["epochs"] == 2.0


def test_a_relative_model_directory_is_named_absolutely_in_the_adapter(tmp_path, capsys, monkeypatch):
    """AutoPeftModelForCausalLM finds the base model from adapter_config.json: a relative --model would name it only
    from the directory the run started in (and peft would look the name up on the Hub elsewhere)."""
    save_checkpoint("qwen3_moe", str(tmp_path / "model"))
    data_path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the router picks two experts for every token"}] * 4)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(capsys, "train", "--model", "model", "--data", data_path, "--max-steps", 1,
                              "--max-seq-length", 64, "--output-dir", "out")
    assert code == 0, stderr
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "model")


def _full_run_and_its_copy_at(tmp_path, args, step: int):
    """(full, cut): a whole run of `args`, and a directory holding only its checkpoint at `step` and its demo model."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run_subprocess(*args, "--output-dir", full)
    assert proc.returncode == 0, proc.stderr
    os.makedirs(cut / "checkpoints")
    name = f"step-{step:06d}"
    shutil.copytree(full / "checkpoints" / name, cut / "checkpoints" / name)
    shutil.copytree(full / "demo-model", cut / "demo-model")
    return full, cut


@pytest.mark.parametrize("optim", ["adamw", "adamw_bf16"])  # adamw_bf16: its rounding noise resumes too
def test_resume_reproduces_the_uninterrupted_loss_trajectory(tmp_path, capsys, optim):
    args = ("train", "--optim", optim, "--max-steps", 8, "--save-steps", 4, "--batch-size", 4, "--grad-accum", 2, "--keep-checkpoints", 3)
    # An interrupted run: what the full run had on disk right after its step-4 checkpoint (metrics logged
    # to step 6 included, as if it died there), and a half-written checkpoint that must be ignored.
    full, cut = _full_run_and_its_copy_at(tmp_path, args, 4)
    shutil.copytree(full / "checkpoints" / "step-000008", cut / "checkpoints" / ".tmp-step-000008")
    rows = metrics(full)
    write_jsonl(cut / "metrics.jsonl", rows[:6])
    proc = run_subprocess(*args, "--output-dir", cut, "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = metrics(cut)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    # Same data order, optimizer and schedule state: the same losses (CPU float32 is deterministic).
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in rows]
    assert summary(cut)["resumed_from_step"] == 4
    saved_full = torch.load(full / "checkpoints" / "step-000008" / "state.pt", weights_only=False)["trainable"]
    saved_cut = torch.load(cut / "checkpoints" / "step-000008" / "state.pt", weights_only=False)["trainable"]
    assert all(torch.equal(saved_full[k], saved_cut[k]) for k in saved_full)
    # Resuming with a setting that changes the batches would not continue the same run: refused.
    before = (cut / "metrics.jsonl").read_text()
    code, _, stderr = run_cli(capsys, *args[:-6], "--batch-size", 2, "--grad-accum", 2, "--keep-checkpoints", 3,
                              "--output-dir", cut, "--resume")
    assert code == 2 and "was trained with --batch-size 4, this run has 2" in stderr
    assert (cut / "metrics.jsonl").read_text() == before


def test_merge_subcommand_folds_the_adapter(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 2, "--lr", "0.05")
    assert code == 0, stderr
    merged = tmp_path / "merged"
    proc = run_subprocess("merge", out / "demo-model", out / "adapter", merged)
    assert proc.returncode == 0, proc.stderr
    import transformers

    from ..models.helpers import plain_peft_model

    ids = torch.tensor([[5, 17, 42, 9, 33]])
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged, local_files_only=True, dtype=torch.float32)
    peft_model = plain_peft_model(str(out / "demo-model"), str(out / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, peft_model(input_ids=ids).logits, atol=1e-4)
    assert (merged / "tokenizer.json").is_file()
    proc = run_subprocess("merge", out / "demo-model", out / "adapter", merged)  # refuses to overwrite
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_layers_gives_the_same_run(tmp_path, capsys):
    """--checkpoint-layers (here: recompute only the first of the demo's 4 layers) changes speed and memory, not
    the training: the same losses as full checkpointing."""
    losses = {}
    for layers in (None, 1, "auto"):  # auto: on CPU there is no memory to plan for, every layer stays checkpointed
        out = tmp_path / f"out-{layers}"
        extra = () if layers is None else ("--checkpoint-layers", layers)
        code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 3, *extra)
        assert code == 0, stderr
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[layers] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses[None]) == 3
    assert losses[1] == pytest.approx(losses[None], abs=1e-6)
    assert losses["auto"] == losses[None]
    plan = json.loads((tmp_path / "out-auto" / "summary.json").read_text())["checkpoint_layers"]
    if torch.cuda.is_available():  # measured and checked: the demo's 4 layers fit with few or none checkpointed
        assert plan["checkpoint_layers"] in range(plan["layers"] + 1) and plan["probe_peak_bytes"] > 0
    else:
        assert plan["checkpoint_layers"] is None and "cpu" in plan["why"]


def test_the_plan_gets_the_memory_cap_and_the_kept_attention_switch(tmp_path, capsys, monkeypatch):
    from moetune import FastMoEModel

    asked = []

    def plan(model, batch_size, seq_len, **kwargs):
        asked.append((batch_size, seq_len, kwargs))
        return {"checkpoint_layers": None, "layers": 4, "why": "test"}

    monkeypatch.setattr(FastMoEModel, "fit_checkpoint_layers", staticmethod(plan))
    for extra, keep in (((), True), (("--no-keep-attention", "--max-memory", "30", "--step-in-backward",
                                      "--max-grad-norm", "0"), False)):
        code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / f"out-{keep}", "--max-steps", 1, *extra)
        assert code == 0, stderr
        # No plan made (a CPU): said where a cap was asked for, quiet where the plan is only the default
        assert ("moetune: checkpoint plan: test" in stderr) is not keep
        assert asked[-1][2]["keep_attention"] is keep
        assert asked[-1][2]["step_in_backward"] is not keep
    assert asked[-1][2]["max_memory_gib"] == 30


def test_step_in_backward_gives_the_same_run(tmp_path, capsys):
    """--step-in-backward changes where the optimizer steps (and the memory), not the training: the same losses
    and adapter as the usual step, both without clipping (CPU float32 is deterministic)."""
    runs = {}
    for mode in ("usual", "in-backward"):
        out = tmp_path / mode
        extra = ("--step-in-backward",) if mode == "in-backward" else ()
        code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 4, "--max-grad-norm", 0, *extra)
        assert code == 0, stderr
        runs[mode] = (metrics(out), torch.load(out / "checkpoints" / "step-000004" / "state.pt", weights_only=False))
    (usual_rows, usual_state), (rows, state) = runs["usual"], runs["in-backward"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in usual_rows] and len(rows) == 4
    assert [r["lr"] for r in rows] == [r["lr"] for r in usual_rows]
    assert all(torch.equal(usual_state["trainable"][k], v) for k, v in state["trainable"].items())
    assert usual_state["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()


def test_resume_refuses_other_data_and_a_shorter_run_but_takes_another_spelling(tmp_path, capsys, monkeypatch):
    """The data are compared as the file they name and as what it holds: the same file by another path resumes;
    the same path with other records, or a run that would end before its checkpoint, is refused, nothing written."""
    data = write_jsonl(tmp_path / "d.jsonl", [FORMAT_RECORDS["text"][0]] * 12)
    out = tmp_path / "out"
    args = ("train", "--max-steps", 4, "--save-steps", 2, "--batch-size", 2, "--output-dir", out)
    code, _, stderr = run_cli(capsys, *args, "--data", data)
    assert code == 0, stderr
    shutil.rmtree(out / "checkpoints" / "step-000004")
    before = (out / "metrics.jsonl").read_text()
    code, _, stderr = run_cli(capsys, *args[:1], "--max-steps", 1, *args[3:], "--data", data, "--resume")
    assert code == 2 and "this run ends at step 1" in stderr and "resumes (2)" in stderr, stderr
    write_jsonl(tmp_path / "d.jsonl", [FORMAT_RECORDS["text"][0]] * 11)
    code, _, stderr = run_cli(capsys, *args, "--data", data, "--resume")
    assert code == 2 and "was trained on other data" in stderr, stderr
    assert (out / "metrics.jsonl").read_text() == before
    write_jsonl(tmp_path / "d.jsonl", [FORMAT_RECORDS["text"][0]] * 12)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(capsys, *args, "--data", "./d.jsonl", "--resume")
    assert code == 0, stderr
    assert summary(out)["resumed_from_step"] == 2


def test_resume_takes_the_same_records_from_another_file_and_says_when_its_data_is_gone(tmp_path, capsys):
    """A run trained from a pipe (`--data <(zcat ...)`: a path that lives one process) resumes from any file holding
    the same records (the data's fingerprint decides, not its name); without --data, it says the data are gone."""
    records = [FORMAT_RECORDS["text"][0]] * 12
    piped = write_jsonl(tmp_path / "piped.jsonl", records)
    out = tmp_path / "out"
    args = ("train", "--max-steps", 4, "--save-steps", 2, "--batch-size", 2, "--output-dir", out)
    code, _, stderr = run_cli(capsys, *args, "--data", piped)
    assert code == 0, stderr
    shutil.rmtree(out / "checkpoints" / "step-000004")
    os.remove(piped)
    before = (out / "metrics.jsonl").read_text()
    code, _, stderr = run_cli(capsys, *args, "--resume")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"--resume: the run was trained on --data {os.path.realpath(tmp_path)}/piped.jsonl, which is gone" in stderr
    assert (out / "metrics.jsonl").read_text() == before
    code, _, stderr = run_cli(capsys, *args, "--data", write_jsonl(tmp_path / "copy.jsonl", records), "--resume")
    assert code == 0, stderr
    assert summary(out)["resumed_from_step"] == 2


@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_a_resume_whose_targets_resolve_to_other_modules_names_them(tmp_path, capsys, monkeypatch):
    """The same --target-modules may reach other modules (latent attention's default took in its q/kv projections on
    2026-12-06): the refusal names the modules either side has."""
    from moetune.models import get_spec

    model = save_checkpoint("deepseek_v3", str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [FORMAT_RECORDS["text"][0]] * 8)
    args = ("train", "--model", model, "--data", data, "--max-seq-length", 64, "--batch-size", 2,
            "--save-steps", 2, "--output-dir", tmp_path / "out")
    code, _, stderr = run_cli(capsys, *args, "--max-steps", 2)
    assert code == 0, stderr
    old_default = ("q_proj", "k_proj", "v_proj", "o_proj")
    monkeypatch.setitem(get_spec("deepseek_v3").__dict__, "attention_targets", old_default)
    code, _, stderr = run_cli(capsys, *args, "--max-steps", 4, "--resume")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert ("was trained with other LoRA targets than this run (LoRA on kv_a_proj_with_mqa, kv_b_proj, q_a_proj, "
            "q_b_proj there, on nothing more here): give --target-modules as it had them") in stderr, stderr


@pytest.mark.parametrize("written", ["nothing", "metrics", "a checkpoint"])
def test_an_interrupted_run_says_how_to_go_on(tmp_path, capsys, monkeypatch, written):
    """Ctrl-C: --resume where a checkpoint exists; before the first one, --overwrite where the run wrote something
    (a plain rerun is refused by it, and there is nothing to resume); else nothing to do."""
    import moetune.training

    out = tmp_path / "out"
    if written == "metrics":
        out.mkdir()
        (out / "metrics.jsonl").write_text("")
    if written == "a checkpoint":
        os.makedirs(out / "checkpoints" / "step-000002")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(moetune.training, "train", interrupted)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out)
    assert code == 130
    advice = {"nothing": "nothing was written", "metrics": "no checkpoint yet; start again with --overwrite",
              "a checkpoint": "continue with --resume"}
    assert stderr.rstrip().endswith(f"interrupted; {advice[written]}" if written == "nothing" else
                                    advice[written] + f" --output-dir {out}"), stderr


def test_a_resume_between_logged_steps_logs_the_same_rows(tmp_path):
    """A checkpoint between two logged steps carries the metrics' window (loss and expert counts so far): the resumed
    run's next row averages the same steps as the uninterrupted run's, not only those after the resume."""
    args = ("train", "--max-steps", 6, "--save-steps", 2, "--logging-steps", 3, "--batch-size", 4, "--keep-checkpoints", 3)
    full, cut = _full_run_and_its_copy_at(tmp_path, args, 2)
    write_jsonl(cut / "metrics.jsonl", [])
    proc = run_subprocess(*args, "--output-dir", cut, "--resume")
    assert proc.returncode == 0, proc.stderr
    rows, resumed = metrics(full), metrics(cut)
    assert [r["step"] for r in resumed] == [r["step"] for r in rows] == [3, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r["expert_load"] for r in resumed] == [r["expert_load"] for r in rows]


def test_a_bare_resume_takes_the_checkpoints_settings(tmp_path, capsys):
    """`moetune train --output-dir run --resume` continues with the settings the run was started with (its checkpoint
    keeps them); a setting given again on the command line wins (here: more steps)."""
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--r", 8, "--lora-alpha", 16, "--max-steps", 4, "--save-steps", 2,
                              "--batch-size", 4, "--output-dir", out)
    assert code == 0, stderr
    shutil.rmtree(out / "checkpoints" / "step-000004")
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", out, "--resume")
    assert code == 0, stderr
    assert "done: 4 steps" in stdout and summary(out)["resumed_from_step"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    code, stdout, stderr = run_cli(capsys, "train", "--output-dir", out, "--resume", "--max-steps", 6)
    assert code == 0, stderr
    assert "done: 6 steps" in stdout and [r["step"] for r in metrics(out)] == list(range(1, 7))


def test_a_chat_template_that_never_trains_a_stop_token_is_named(tmp_path, capsys):
    model_dir = save_checkpoint("qwen3_moe", str(tmp_path / "model"), tokenizer=False)
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m.role }} : {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    tok.save_pretrained(model_dir)
    record = {"messages": [{"role": "user", "content": "the router picks"}, {"role": "assistant", "content": "two experts"}]}
    data_path = write_jsonl(tmp_path / "d.jsonl", [record] * 4)
    code, _, stderr = run_cli(capsys, "train", "--model", model_dir, "--data", data_path, "--max-steps", 1,
                              "--max-seq-length", 64, "--output-dir", tmp_path / "out")
    assert code == 0, stderr
    assert "moetune: data: the chat template ends an assistant turn with no special token" in stderr


def test_a_failed_merge_leaves_no_directory_and_one_line(tmp_path, capsys, monkeypatch):
    import transformers

    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "train", "--output-dir", out, "--max-steps", 1)
    assert code == 0, stderr

    def failing_save(self, directory, **kwargs):  # a disk that fills halfway, with an error that has no message
        (directory_path := __import__("pathlib").Path(directory)).mkdir(exist_ok=True)
        (directory_path / "config.json").write_text("{}")
        raise RuntimeError("")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", failing_save)
    code, _, stderr = run_cli(capsys, "merge", out / "demo-model", out / "adapter", tmp_path / "merged")
    assert code == 2 and stderr.strip() == "moetune merge: error: RuntimeError", stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither the merged directory nor its staging one
