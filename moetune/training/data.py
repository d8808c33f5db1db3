"""Training data: JSONL records -> token ids with labels -> micro-batches.

Formats (decided by the first record; every record of a file must match it):
    {"text": "..."}                                       loss on every token
    {"messages": [{"role": ..., "content": ...}, ...]}    rendered with the tokenizer's chat template;
                                                          loss on the assistant turns only
    {"instruction": ..., "input": ..., "output": ...}     user turn = instruction (+ input), assistant
                                                          turn = output; loss on the output only

Labels use -100 for tokens without loss (transformers' ignore index); the model shifts them itself.

Where the assistant turns are (chat records):
- a template with `{% generation %}` markers marks them itself (transformers' assistant mask);
- a template TRL has a training version of (Qwen3, gpt-oss, GLM-4.5, DeepSeek-V3, Llama 3, ...) is rendered through
  that version: the official templates render a turn differently once it is no longer the last (Qwen3 drops the
  empty think block, gpt-oss ends it with <|end|> instead of <|return|>) or put the token that ends a turn in the
  next message (GLM's <|user|>), so only the training version places the loss on every turn and its stop token;
- any other template: each assistant turn is what rendering the conversation up to it adds after the generation
  prompt, which holds where the rendering of a prefix is a prefix of the whole (ChatML, the demo's).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

__all__ = ["Example", "load_examples", "stop_token_note", "training_template", "make_units", "epoch_steps", "collate",
           "collate_fixed", "IGNORE"]

IGNORE = -100
FORMATS = {"text": ("text",), "messages": ("messages",), "instruction": ("instruction", "output")}
# Used only when an instruction record meets a tokenizer without a chat template (base models).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    """One record, tokenised. labels[i] is input_ids[i] where the loss applies, else IGNORE."""

    input_ids: list[int]
    labels: list[int]


# A \uD800-\uDFFF escape: JSON decodes a lone one (a truncated emoji, seen in scraped data) into a string no tokenizer
# takes; only lines with one get the full check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    if os.path.isdir(path):
        raise ValueError(f"--data: {path} is a directory; expected a JSONL file")
    if not os.path.exists(path):
        raise ValueError(f"--data: no such file: {path}")
    try:
        with open(path, "rb") as f:
            records = [(line_no, record) for line_no, record in _records(f, path)]
    except OSError as err:
        raise ValueError(f"--data: cannot read {path}: {err.strerror}") from None
    if not records:
        raise ValueError(f"--data: {path} holds no records (empty dataset)")
    return records


def _records(f, path: str):
    """(line number, record) of each non-blank line of a binary file, read once (a pipe too: `--data <(zcat
    train.jsonl.gz)`) and split as text mode's universal newlines would (\\n, \\r\\n, \\r), not at U+2028 inside a
    string; decoded line by line, to name a bad one."""
    line_no = 0
    for chunk in f:  # each ends at a \n
        for raw in chunk.splitlines():
            line_no += 1
            line = _decode(raw, path, line_no)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--data: {path}, line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                got = "null" if record is None else type(record).__name__
                raise ValueError(f"--data: {path}, line {line_no}: expected a JSON object, got {got}")
            if _SURROGATE_ESCAPE.search(line):
                try:
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(f"--data: {path}, line {line_no}: a string holds a lone UTF-16 surrogate "
                                     f"(\\u{ord(err.object[err.start]):04x}), which is no text") from None
            yield line_no, record


def _decode(raw: bytes, path: str, line_no: int) -> str:
    """One line of the file as text; a byte-order mark (Windows editors) before the first is skipped."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data: {path}, line {line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                         f"{err.start + 1})") from None
    return line.removeprefix("\ufeff") if line_no == 1 else line


def _detect_format(path: str, line_no: int, record: dict) -> str:
    found = [name for name, keys in FORMATS.items() if all(k in record for k in keys)]
    if len(found) > 1:  # an export carrying a rendered "text" beside its "messages", say: which to train is the user's
        raise ValueError(f"{_where(path, line_no)}: has the fields of more than one format ({', '.join(found)}); "
                         "keep one")
    if found:
        return found[0]
    raise ValueError(
        f"--data: {path}, line {line_no}: expected a record with \"text\", \"messages\" or "
        f"\"instruction\" + \"output\", got keys {sorted(record)}"
    )


def _where(path: str, line_no: int) -> str:
    return f"--data: {path}, line {line_no}"


def _as_messages(fmt: str, record: dict, where: str) -> list[dict]:
    if fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: \"messages\" must be a non-empty list")
        calls = False
        for i, m in enumerate(messages):
            # OpenAI-style tool calls: an assistant message may carry "tool_calls" and no content.
            content_ok = isinstance(m.get("content"), str) if isinstance(m, dict) else False
            if isinstance(m, dict) and m.get("tool_calls") and m.get("content") is None:
                content_ok = calls = True
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not content_ok:
                raise ValueError(
                    f"{where}: messages[{i}] needs string \"role\" and \"content\" fields (content may be null "
                    f"only beside \"tool_calls\")"
                )
        if calls:  # templates read content as a string (DeepSeek-V3's fails on a missing one): an empty one
            messages = [dict(m, content="") if m.get("content") is None else m for m in messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no \"assistant\" message, so nothing to train on")
        return messages
    for key in ("instruction", "input", "output"):
        value = record.get(key, "")
        if not isinstance(value, str) and not (key == "input" and value is None):  # null input: none (pandas' NaN)
            raise ValueError(f"{where}: \"{key}\" must be a string")
    if not record["output"]:
        raise ValueError(f"{where}: \"output\" is empty, so nothing to train on")
    user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _render(tokenizer, messages, where: str, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as err:  # templates raise on conversations they reject (roles, order)
        raise ValueError(f"{where}: the chat template rejects this conversation: {err}") from None


def training_template(tokenizer) -> str | None:
    """The template that marks the assistant turns with {% generation %}: the tokenizer's own where it has the
    markers, else TRL's training version of it for the families TRL knows; None for any other template (its turns
    are then found as prefixes of the rendering)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: "default" is the one apply_chat_template uses
        template = template.get("default")
    if not template:
        return None
    if has_generation_markers(template):
        return template
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # TRL's probes of the template may pass a short --max-seq-length: not ours to say
    try:
        return get_training_chat_template(tokenizer)
    except Exception:  # TRL has no training version of this template (or its probes of it raised): the prefix rule
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def _marked_example(tokenizer, messages: list[dict], template: str, where: str) -> Example:
    try:
        enc = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            tokenizer_kwargs={"verbose": False},  # an over-long record gets our error naming its line only
        )
    except TemplateError as err:  # templates raise on conversations they reject (roles, order)
        raise ValueError(f"{where}: the chat template rejects this conversation: {err}") from None
    ids = list(enc["input_ids"])
    return Example(ids, [t if marked else IGNORE for t, marked in zip(ids, enc["assistant_masks"])])


def _chat_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of the assistant turns), each span from after the generation prompt
    to the end of the turn (its end-of-turn marker included: the model must learn to stop)."""
    full = _render(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        turn = _render(tokenizer, messages[: i + 1], where)
        # A template that rewrites earlier turns (e.g. dropping old reasoning) breaks the prefix property, and
        # then the labels cannot be placed: say so rather than train on the wrong tokens.
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise ValueError(
                f"{where}: the chat template renders earlier turns differently from the last, and it has no "
                "{% generation %} markers to say where the assistant turns are; add them or use {\"text\"} records"
            )
        spans.append((len(prompt), len(turn)))
    return full, spans


def _tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]] | None, special_tokens: bool) -> Example:
    """Token ids of text with loss inside the character spans (everywhere where spans is None). special_tokens: the
    tokenizer adds its BOS (plain text; rendered chat templates write their own)."""
    # verbose=False: an over-long record gets our error naming its line, not transformers' warning too.
    enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    if spans is None:  # plain text: loss everywhere, and an end-of-sequence token to learn where text ends
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return Example(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):  # end > start: added BOS/EOS have no characters
            labels[i] = ids[i]
    return Example(ids, labels)


def _tokenize(tokenizer, fmt: str, record: dict, where: str, template: str | None) -> Example:
    if fmt == "text":
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(f"{where}: \"text\" must be a non-empty string")
        return _tokenize_spans(tokenizer, record["text"], None, special_tokens=True)
    messages = _as_messages(fmt, record, where)
    rendering = template or tokenizer.chat_template
    calls = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
    if calls is not None and rendering and "tool_calls" not in str(rendering):  # (a dict of named templates too)
        raise ValueError(f"{where}: messages[{calls}] has \"tool_calls\", which the chat template does not render")
    if template is not None:
        return _marked_example(tokenizer, messages, template, where)
    if tokenizer.chat_template:
        text, spans = _chat_spans(tokenizer, messages, where)
        return _tokenize_spans(tokenizer, text, spans, special_tokens=False)
    if fmt == "messages":
        raise ValueError(f"{where}: \"messages\" records need a tokenizer with a chat template; this one has none")
    # A base model's tokenizer: the plain prompt, with the BOS the tokenizer adds (as text records get it), and the
    # answer ending in EOS, which is trained.
    template_text = PLAIN_PROMPT_INPUT if record.get("input") else PLAIN_PROMPT
    prompt = template_text.format(instruction=record["instruction"], input=record.get("input", ""))
    text = prompt + record["output"]
    example = _tokenize_spans(tokenizer, text, [(len(prompt), len(text))], special_tokens=True)
    eos = tokenizer.eos_token_id
    if eos is not None and example.input_ids[-1] != eos:
        return Example(example.input_ids + [eos], example.labels + [eos])
    if eos is not None:  # the tokenizer appended EOS itself, outside the answer's characters: train it
        return Example(example.input_ids, example.labels[:-1] + [eos])
    return example


def stop_token_note(tokenizer) -> str | None:
    """A warning when the assistant turns' labels do not end on a special token (the model would never learn to
    end its turn), found by placing the labels of a probe conversation as the records' are placed; None if they do
    or the tokenizer has no chat template."""
    if not tokenizer.chat_template:
        return None
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]
    try:
        example = _tokenize(tokenizer, "messages", {"messages": probe}, "probe", training_template(tokenizer))
    except ValueError:
        return None  # the records themselves say what is wrong
    special = (set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())) - {tokenizer.unk_token_id}
    trained = [t for t in example.labels if t != IGNORE and tokenizer.decode([t]).strip()]
    if trained and trained[-1] in special:
        return None
    return ("the chat template ends an assistant turn with no special token inside the turn's loss, so the model "
            "is not trained to stop (the template's end-of-turn token is missing, not a special token of this "
            "tokenizer, or outside the turn's {% generation %} markers)")


def load_examples(path: str, tokenizer, max_seq_length: int) -> tuple[str, list[Example]]:
    """(format name, tokenised examples) of a JSONL file; any bad record raises ValueError naming its line."""
    records = _read_jsonl(path)
    fmt = _detect_format(path, *records[0])
    template = training_template(tokenizer) if fmt != "text" else None
    examples = []
    for line_no, record in records:
        where = _where(path, line_no)
        if not all(k in record for k in FORMATS[fmt]):
            missing = [k for k in FORMATS[fmt] if k not in record]
            raise ValueError(f"{where}: missing field {', '.join(repr(k) for k in missing)} (line {records[0][0]} is {fmt!r} format)")
        _detect_format(path, line_no, record)  # not also another format's record
        example = _tokenize(tokenizer, fmt, record, where, template)
        if len(example.input_ids) > max_seq_length:
            raise ValueError(
                f"{where}: {len(example.input_ids)} tokens, longer than --max-seq-length {max_seq_length}"
            )
        if all(label == IGNORE for label in example.labels[1:]):
            raise ValueError(f"{where}: no tokens to train on after tokenisation")
        examples.append(example)
    return fmt, examples


def make_units(examples: list[Example], max_seq_length: int, packing: bool) -> list[list[Example]]:
    """Training rows as lists of examples: one example each, or (packing) consecutive examples filling
    up to max_seq_length tokens. Packed once, in file order, so every epoch has the same number of steps."""
    if not packing:
        return [[e] for e in examples]
    units, row, used = [], [], 0
    for e in examples:
        if row and used + len(e.input_ids) > max_seq_length:
            units.append(row)
            row, used = [], 0
        row.append(e)
        used += len(e.input_ids)
    units.append(row)
    return units


def steps_per_epoch(num_units: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(num_units / (batch_size * grad_accum))


def epoch_steps(num_units: int, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Unit indices of each optimizer step of one epoch: [step][micro-batch][row].

    The order is a pure function of (seed, epoch): a resumed run finds its data position from the step
    number alone, with no sampler state to save.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any --seed: within 64 bits
    order = torch.randperm(num_units, generator=gen).tolist()
    micro = [order[i : i + batch_size] for i in range(0, num_units, batch_size)]
    return [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]


def collate(units: list[list[Example]], pad_id: int, packed: bool, boundaries: bool = False) -> dict:
    """Right-padded tensors. Unpacked rows get an attention_mask where any row is padded (none where no row is:
    transformers then knows the mask is plain causal without looking at a tensor on the GPU, and gpt-oss's
    full-attention layers can leave flex attention, moetune/models/fast_sinks.py); packed rows get position_ids that
    restart at every example, from which transformers builds a block-diagonal causal mask (no cross-example
    attention), and with `boundaries` also the examples' offsets for the varlen attention that needs no mask
    (moetune/models/packed_attention.py; each row's padding a segment of its own)."""
    length = max(sum(len(e.input_ids) for e in unit) for unit in units)
    ids, labels, positions, mask, segments = [], [], [], [], []
    for unit in units:
        row_ids, row_labels, row_pos = [], [], []
        for e in unit:
            row_ids += e.input_ids
            # The first token of an example is not predicted from the previous example's last token.
            row_labels += [IGNORE] + e.labels[1:]
            row_pos += list(range(len(e.input_ids)))
        pad = length - len(row_ids)
        mask.append([1] * len(row_ids) + [0] * pad)
        ids.append(row_ids + [pad_id] * pad)
        labels.append(row_labels + [IGNORE] * pad)
        positions.append(row_pos + list(range(pad)))  # padding is a segment of its own
        segments.append([len(e.input_ids) for e in unit] + ([pad] if pad else []))
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if packed:
        batch["position_ids"] = torch.tensor(positions)
        if boundaries:
            from ..models.packed_attention import boundaries as segment_offsets

            batch.update(segment_offsets(segments, length))
    elif any(0 in row for row in mask):
        batch["attention_mask"] = torch.tensor(mask)
    batch["token_mask"] = torch.tensor(mask, dtype=torch.bool)
    return batch


def collate_fixed(units: list[list[Example]], pad_id: int, rows: int, length: int) -> dict[str, torch.Tensor]:
    """Unpacked rows as one fixed-shape [rows, length] batch (a CUDA graph's input buffers: --cuda-graph): each row
    right-padded to `length`, missing rows all padding, with no attention_mask. Under the causal mask a real token
    attends only to the tokens before it, all real where padding comes last, so its output (and the loss, with the
    padding's labels ignored) is what the padded batch with a mask gives; the padding's own outputs go unused."""
    if len(units) > rows or any(len(unit) != 1 for unit in units):
        raise ValueError(f"units: expected at most {rows} rows of one example each, got {[len(u) for u in units]}")
    ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE, dtype=torch.long)
    token_mask = torch.zeros(rows, length, dtype=torch.bool)
    for row, (e,) in enumerate(units):
        n = len(e.input_ids)
        if n > length:
            raise ValueError(f"units: a row of {n} tokens does not fit in {length}")
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor([IGNORE] + e.labels[1:])
        token_mask[row, :n] = True
    return {"input_ids": ids, "labels": labels, "token_mask": token_mask}
