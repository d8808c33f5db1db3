"""Shared pieces of the training tests: the CLI in-process and as a subprocess, JSONL files, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from moetune import cli

DEMO_RECORD = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """moetune's main() in this process (a CLI runner): (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """The installed entry point's module in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "moetune.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


def write_jsonl(path, records, raw_lines=()) -> str:
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(output_dir) -> dict:
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)


# Each family's added tokens, for family_tokenizer (the names its official chat template writes).
FAMILY_TOKENS = {
    "qwen3": dict(eos="<|im_end|>", bos=None, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  normal=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "gptoss": dict(eos="<|return|>", bos=None, normal=[],
                   special=["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]),
    "glm4moe": dict(eos="<|endoftext|>", bos=None, normal=["<think>", "</think>", "<tool_call>", "</tool_call>"],
                    special=["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]),
    "deepseekv3": dict(eos="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>", normal=["<think>", "</think>"],
                       special=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]),
}


def family_tokenizer(family: str, chat_template: str | None = None):
    """The demo's byte-level BPE with a model family's special tokens and its official chat template (TRL keeps the
    hub's templates verbatim: trl.chat_template_utils.<family>_chat_template); chat_template replaces it."""
    import transformers
    import trl.chat_template_utils
    from tokenizers import AddedToken, Tokenizer

    from moetune.training.prepare import DEMO_DIR

    spec = FAMILY_TOKENS[family]
    tok = Tokenizer.from_file(os.path.join(DEMO_DIR, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["normal"]])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=spec["eos"], bos_token=spec["bos"], pad_token=spec["eos"]
    )
    tokenizer.chat_template = chat_template or getattr(trl.chat_template_utils, f"{family}_chat_template")
    return tokenizer


def lm_training_step(model, optimizer, ids):
    """A step over one fixed batch as a captured step must be: forward, backward, optimizer step, gradients set to
    None (nothing left for the next replay); returns the loss on the device."""

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step
