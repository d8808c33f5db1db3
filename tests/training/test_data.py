"""Data formats, response-only labels, packing and batching, on the demo tokenizer and a template-less one."""

from __future__ import annotations

import pytest
import torch
import transformers

from moetune.training import data
from moetune.training.prepare import DEMO_DIR

from ..models.helpers import tiny_tokenizer
from .helpers import family_tokenizer, write_jsonl


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


def test_packed_rows_carry_their_examples_offsets_for_varlen_attention():
    examples = [data.Example([5, 6, 7], [5, 6, 7]), data.Example([8, 9], [8, 9]), data.Example([10, 11, 12, 13], [10, 11, 12, 13])]
    units = data.make_units(examples, max_seq_length=6, packing=True)
    batch = data.collate(units, pad_id=0, packed=True, boundaries=True)
    # rows of 5 laid end to end: 3 + 2 | 4 + one padding token, a segment of its own
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10] and batch["max_length_q"] == 4
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"] and batch["max_length_k"] == 4
    assert "cu_seq_lens_q" not in data.collate(units, pad_id=0, packed=True)


def test_unpacked_rows_get_an_attention_mask_only_where_one_is_padded():
    short, long = data.Example([5, 6], [5, 6]), data.Example([7, 8, 9], [7, 8, 9])
    padded = data.collate([[short], [long]], pad_id=0, packed=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert padded["token_mask"].tolist() == [[True, True, False], [True, True, True]]
    full = data.collate([[long], [long]], pad_id=0, packed=False)
    assert "attention_mask" not in full and "position_ids" not in full  # plain causal: nothing to mask
    assert full["token_mask"].all()


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


def test_line_endings_of_any_platform_and_a_line_separator_inside_a_string(tmp_path, demo_tokenizer):
    """\\r\\n (Windows) and a lone \\r (old Macs) end lines as \\n does; U+2028 inside a string does not."""
    path = tmp_path / "endings.jsonl"
    path.write_bytes('{"text": "one"}\r\n{"text": "two"}\r{"text": "three\u2028still three"}'.encode())
    fmt, examples = data.load_examples(str(path), demo_tokenizer, 64)
    assert fmt == "text" and len(examples) == 3
    assert "three\u2028still three" in demo_tokenizer.decode(examples[2].input_ids)


def test_a_pipe_is_read_once(tmp_path, demo_tokenizer):
    """`--data <(zcat train.jsonl.gz)`: a named pipe, not a regular file, read once."""
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as f:
            f.write('{"text": "from a pipe"}\n{"text": "and more"}\n')

    writer = threading.Thread(target=write)
    writer.start()
    fmt, examples = data.load_examples(str(fifo), demo_tokenizer, 64)
    writer.join()
    assert fmt == "text" and len(examples) == 2


def test_a_null_input_is_no_input(tmp_path, demo_tokenizer):
    """pandas writes a missing "input" as null: the prompt is then the instruction alone, as with no "input"."""
    with_null = {"instruction": "Say hi.", "input": None, "output": "hi"}
    without = {"instruction": "Say hi.", "output": "hi"}
    _, [a] = data.load_examples(write_jsonl(tmp_path / "a.jsonl", [with_null]), demo_tokenizer, 64)
    _, [b] = data.load_examples(write_jsonl(tmp_path / "b.jsonl", [without]), demo_tokenizer, 64)
    assert a == b


TWO_TURNS = [
    {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And 3 plus 4?"}, {"role": "assistant", "content": "7."},
]


def load_one(tmp_path, tokenizer, record) -> data.Example:
    _, [example] = data.load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer, 256)
    return example


def test_qwen3_multi_turn_trains_every_reply_as_trl_training_template_renders_it(tmp_path):
    # The official template adds the empty think block only to the last turn, so no rendering of a prefix is a
    # prefix of the whole: these records were refused. TRL's training version renders every turn alike.
    tok = family_tokenizer("qwen3")
    example = load_one(tmp_path, tok, {"messages": TWO_TURNS})
    assert trained_text(tok, example) == "<think>\n\n</think>\n\n5.<|im_end|>\n<think>\n\n</think>\n\n7.<|im_end|>\n"
    assert "What is 2 plus 3?" in tok.decode(example.input_ids)
    assert data.stop_token_note(tok) is None


def test_qwen3_tool_calls_with_null_content_and_a_final_user_turn(tmp_path):
    tok = family_tokenizer("qwen3")
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    messages = [
        {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "ok"},
    ]
    trained = trained_text(tok, load_one(tmp_path, tok, {"messages": messages}))
    assert '"name": "add"' in trained and "It is 5.<|im_end|>" in trained
    assert "<tool_response>" not in trained and "ok" not in trained


def test_gpt_oss_trains_end_and_return_stop_tokens(tmp_path):
    tok = family_tokenizer("gptoss")
    trained = trained_text(tok, load_one(tmp_path, tok, {"messages": TWO_TURNS}))
    assert "5.<|end|>" in trained and trained.endswith("7.<|return|>")
    assert "plus" not in trained


def test_glm_trains_the_token_that_ends_a_turn(tmp_path):
    # GLM has no end-of-turn marker: a reply ends when the model writes the next role's token. The official
    # template's turn ends on the content, so the model was never trained to stop.
    tok = family_tokenizer("glm4moe")
    trained = trained_text(tok, load_one(tmp_path, tok, {"messages": TWO_TURNS}))
    assert "5.<|user|>" in trained
    assert data.stop_token_note(tok) is None


def test_deepseek_v3_instruction_records_are_accepted(tmp_path):
    tok = family_tokenizer("deepseekv3")
    example = load_one(tmp_path, tok, {"instruction": "Add 2 and 3.", "output": "5."})
    assert trained_text(tok, example).endswith("5.<｜end▁of▁sentence｜>")
    assert example.input_ids.count(tok.bos_token_id) == 1


def test_a_template_with_generation_markers_marks_the_turns_itself(tmp_path):
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
        "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = family_tokenizer("qwen3", chat_template=template)
    assert data.training_template(tok) == template
    assert trained_text(tok, load_one(tmp_path, tok, {"messages": TWO_TURNS})) == "5.<|im_end|>7.<|im_end|>"


def test_an_unknown_template_that_rewrites_earlier_turns_is_refused_in_one_line(tmp_path):
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think>"
        "</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
        "assistant\n{% endif %}"
    )
    tok = family_tokenizer("qwen3", chat_template=template)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(ValueError, match=r"line 1: the chat template renders earlier turns differently.*generation"):
        data.load_examples(path, tok, 256)


def test_a_template_whose_turns_end_without_a_special_token_gets_a_note():
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
        "assistant: {% endif %}"
    )
    tok = family_tokenizer("qwen3", chat_template=template)
    assert "not trained to stop" in data.stop_token_note(tok)
    assert data.stop_token_note(transformers.AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)) is None


def test_instruction_records_on_a_base_tokenizer_keep_its_bos_and_train_eos(tmp_path):
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("the router picks").input_ids[0] == tok.bos_token_id
    example = load_one(tmp_path, tok, {"instruction": "the router picks", "output": "two experts"})
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids.count(tok.bos_token_id) == 1
    assert trained_text(tok, example) == "two experts </s>"


def test_tool_calls_the_template_cannot_render_are_refused_and_null_content_renders_as_empty(tmp_path, demo_tokenizer):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    with pytest.raises(ValueError, match=r"line 1: messages\[1\] has \"tool_calls\", which the chat template does not"):
        data.load_examples(path, demo_tokenizer, 256)  # the demo's ChatML would train an empty turn
    tok = family_tokenizer("deepseekv3")  # its template reads content as a string
    _, [example] = data.load_examples(write_jsonl(tmp_path / "e.jsonl", [{"messages": messages}]), tok, 1024)
    trained = trained_text(tok, example)
    assert "add" in trained and trained.endswith("It is 5.<｜end▁of▁sentence｜>")


def test_an_over_long_marked_record_gets_only_our_error(tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    tok = family_tokenizer("qwen3")
    tok.model_max_length = 64  # as moetune train sets it (transformers warns past it)
    record = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    with CaptureLogger(hf_logging.get_logger("transformers")) as logged:
        with pytest.raises(ValueError, match="longer than --max-seq-length 64"):
            data.load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), tok, 64)
    assert "Token indices sequence length" not in logged.out


def test_a_template_that_raises_on_trls_probes_keeps_the_prefix_rule(tmp_path):
    # TRL renders a tool message through the template to decide; a template that fails there with a non-template
    # error (arguments added to a number: TypeError) still trains by the prefix rule.
    template = (
        "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments + 1 }}{% endif %}<|im_start|>"
        "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    tok = family_tokenizer("qwen3", chat_template=template)
    assert data.training_template(tok) is None
    assert trained_text(tok, load_one(tmp_path, tok, {"messages": TWO_TURNS})) == "5.<|im_end|>\n7.<|im_end|>\n"


def test_collate_fixed_is_collate_padded_to_a_fixed_shape_without_a_mask():
    """--cuda-graph's batches: collate's rows, right-padded to the given length, missing rows all padding; no
    attention_mask (the causal mask keeps right padding out of every real token's attention)."""
    units = [[data.Example(input_ids=[5, 6, 7], labels=[data.IGNORE, 6, 7])],
             [data.Example(input_ids=[8, 9], labels=[8, 9])]]
    loose = data.collate(units, pad_id=0, packed=False)
    fixed = data.collate_fixed(units, pad_id=0, rows=3, length=5)
    assert set(fixed) == {"input_ids", "labels", "token_mask"}
    for name in fixed:
        assert fixed[name].shape == (3, 5)
        assert torch.equal(fixed[name][:2, :3], loose[name])
    assert (fixed["input_ids"][:, 3:] == 0).all() and (fixed["labels"][2] == data.IGNORE).all()
    assert not fixed["token_mask"][:, 3:].any() and not fixed["token_mask"][2].any()
    with pytest.raises(ValueError, match="units: expected at most 1 rows of one example each"):
        data.collate_fixed(units, pad_id=0, rows=1, length=5)
    with pytest.raises(ValueError, match="units: a row of 3 tokens does not fit in 2"):
        data.collate_fixed(units, pad_id=0, rows=2, length=2)
