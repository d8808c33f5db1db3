"""Build the assets of the built-in demo in moetune/demo/: dataset, tokenizer, model config.

    python scripts/build_demo.py

Everything is generated here from templates and a fixed seed: no data or weights come from elsewhere.
The demo model itself is not stored: `moetune train` initialises it from config.json with the run's seed.
Re-running this script rewrites the same files (the tokenizer and dataset are deterministic).
"""

from __future__ import annotations

import json
import os
import random

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moetune", "demo")
NUM_RECORDS = 240
VOCAB_SIZE = 1024
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen3 uses: every turn ends in <|im_end|>, which the model learns to emit after a reply.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("light", "dark"), ("early", "late"),
             ("open", "closed"), ("full", "empty"), ("high", "low"), ("new", "old"), ("wet", "dry")]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["cup", "kite", "boat", "chair", "lamp", "book", "shoe", "door", "tree", "clock"]
WORDS = ["expert", "router", "token", "adapter", "layer", "matrix", "gradient", "sparse", "model", "batch"]


def _record(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        q, r = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        n = rng.randrange(1, 99)
        q, r = f"Which number comes after {n}?", f"The number after {n} is {n + 1}."
    elif kind == 2:
        word, opposite = rng.choice(OPPOSITES)
        q, r = f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    elif kind == 3:
        words = rng.sample(WORDS, 3)
        q, r = f"Reverse these words: {' '.join(words)}", " ".join(reversed(words))
    elif kind == 4:
        colour, thing = rng.choice(COLOURS), rng.choice(THINGS)
        q, r = f"Describe a {colour} {thing} in one sentence.", f"It is a {thing}, and it is {colour}."
    else:
        word = rng.choice(WORDS)
        q, r = f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}


def build_dataset() -> list[dict]:
    rng = random.Random(0)
    return [_record(rng) for _ in range(NUM_RECORDS)]


def build_tokenizer(records: list[dict]) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on the demo records (any text still encodes: bytes are the base alphabet)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for rec in records for m in rec["messages"]] + ["user", "assistant", "system"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_config(tokenizer) -> transformers.Qwen3MoeConfig:
    """Qwen3-MoE, shrunk: 4 layers, hidden 128, 8 experts top-2; ~1.5M parameters, fast on 2 CPU cores."""
    return transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        initializer_range=0.05,
    )


def main() -> None:
    records = build_dataset()
    with open(os.path.join(DEMO_DIR, "data.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    tokenizer = build_tokenizer(records)
    tokenizer.save_pretrained(DEMO_DIR)
    build_config(tokenizer).save_pretrained(DEMO_DIR)
    print(f"wrote {DEMO_DIR}: {len(records)} records, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
