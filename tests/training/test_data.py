"""Data formats, response-only labels, packing and batching, on the demo tokenizer and a template-less one."""

from __future__ import annotations

import pytest
import torch
import transformers

from moetune.training import data
from moetune.training.prepare import DEMO_DIR

from ..models.helpers import tiny_tokenizer
from .helpers import write_jsonl


@pytest.fixture(scope="module")
def demo_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != data.IGNORE])


def test_messages_loss_only_on_assistant_turns(tmp_path, demo_tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 3 plus 4?"},
        {"role": "assistant", "content": "7."},
    ]}
    fmt, [example] = data.load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), demo_tokenizer, 128)
    assert fmt == "messages"
    # Both replies and their end-of-turn markers, nothing of the prompts.
    assert trained_text(demo_tokenizer, example) == "5.<|im_end|>\n7.<|im_end|>\n"


def test_instruction_records_use_the_chat_template_and_train_on_the_output(tmp_path, demo_tokenizer):
    records = [{"instruction": "Reverse these words:", "input": "layer token", "output": "token layer"}]
    fmt, [example] = data.load_examples(write_jsonl(tmp_path / "d.jsonl", records), demo_tokenizer, 128)
    assert fmt == "instruction"
    assert trained_text(demo_tokenizer, example) == "token layer<|im_end|>\n"
    assert "Reverse these words:\n\nlayer token" in demo_tokenizer.decode(example.input_ids)


def test_instruction_without_chat_template_uses_plain_prompt(tmp_path):
    tok = tiny_tokenizer()  # word-level, no chat template
    records = [{"instruction": "the router picks", "output": "two experts"}]
    _, [example] = data.load_examples(write_jsonl(tmp_path / "d.jsonl", records), tok, 64)
    assert trained_text(tok, example) == "two experts </s>"


def test_text_records_train_on_every_token_and_end_with_eos(tmp_path, demo_tokenizer):
    _, [example] = data.load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": "The opposite of hot is cold."}]), demo_tokenizer, 64)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == demo_tokenizer.eos_token_id


def test_packing_fills_rows_and_restarts_positions():
    examples = [data.Example([5, 6, 7], [data.IGNORE, 6, 7]), data.Example([8, 9], [8, 9]), data.Example([10, 11, 12, 13], [10, 11, 12, 13])]
    units = data.make_units(examples, max_seq_length=6, packing=True)
    assert [[len(e.input_ids) for e in u] for u in units] == [[3, 2], [4]]
    batch = data.collate(units, pad_id=0, packed=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # No loss on an example's first token (it would be predicted across the boundary) nor on padding.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, 12, 13, -100]]
    assert "attention_mask" not in batch


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = data.epoch_steps(10, batch_size=3, grad_accum=2, seed=1, epoch=0)
    assert a == data.epoch_steps(10, batch_size=3, grad_accum=2, seed=1, epoch=0)
    assert a != data.epoch_steps(10, batch_size=3, grad_accum=2, seed=1, epoch=1)
    assert sorted(i for step in a for mb in step for i in mb) == list(range(10))
    assert [len(step) for step in a] == [2, 2]  # 4 micro-batches (3, 3, 3, 1) -> 2 optimizer steps
    # Any 64-bit seed, negative ones included, orders the epoch as it always did (no overflow past 2**64).
    assert data.epoch_steps(10, 3, 2, seed=2**63 - 1, epoch=5) == data.epoch_steps(10, 3, 2, seed=2**63 - 1, epoch=5)
    gen = torch.Generator().manual_seed(-7 * 1_000_003 + 1)  # what a negative seed gave before
    order = torch.randperm(10, generator=gen).tolist()
    assert [i for step in data.epoch_steps(10, 3, 2, seed=-7, epoch=1) for mb in step for i in mb] == order


def test_a_byte_order_mark_is_skipped(tmp_path, demo_tokenizer):
    """Windows editors start UTF-8 files with a byte-order mark: not part of the first record."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hello world"}\n{"text": "and again"}\n')
    fmt, examples = data.load_examples(str(path), demo_tokenizer, 64)
    assert fmt == "text" and len(examples) == 2
