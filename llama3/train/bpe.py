"""Train a small byte-level BPE vocabulary for tiny models (`llama3 train-tokenizer`).

Llama 3's own vocabulary has 128,256 entries: for a model of a few million
parameters its embedding table alone would be most of the model.  A tiny model
wants a few thousand tokens learned from its own corpus.

The result is built the way Llama 3's `tokenizer.json` is, through the
`tokenizers` library:
  * the same pre-tokenizer regex (split into words, numbers of up to 3 digits,
    punctuation runs, whitespace), then byte-level mapping, so any text encodes
    with no unknown token;
  * BPE merges learned from the corpus up to `vocab_size`;
  * Llama 3's special tokens (`<|begin_of_text|>`, `<|end_of_text|>`, the chat
    header tokens and `<|eot_id|>`) and Meta's Llama 3 Instruct chat template, so
    a tiny model can be chat fine-tuned (`llama3 sft`) with the real format.

Written files: tokenizer.json and tokenizer_config.json (bos/eos tokens, chat
template), loadable with `llama3.load_tokenizer(folder)`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from llama3.checkpoint.files import atomic_file
from llama3.errors import Llama3Error
from llama3.tokenizer.llama3_tiktoken import SPLIT_PATTERN as LLAMA3_SPLIT_PATTERN  # Meta's Llama 3 split

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# The chat template of Meta-Llama-3-8B-Instruct (tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | os.PathLike, progress: bool = True) -> Path:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens from `texts`; write it to folder `out`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB or vocab_size > 1 << 20:
        raise Llama3Error(f"--vocab-size {vocab_size} must be between {MIN_VOCAB} (256 bytes + "
                          f"{len(SPECIAL_TOKENS)} special tokens) and {1 << 20}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  # tokenizers' bars print bare blank lines where stderr is not a terminal
                                  show_progress=progress and sys.stderr.isatty())
    seen = [0]

    def counted(texts):
        for text in texts:
            seen[0] += len(text)
            yield text

    tokenizer.train_from_iterator(counted(texts), trainer=trainer)
    if seen[0] == 0:
        raise Llama3Error("no text found to learn a vocabulary from (all documents are empty); check --data")
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence([  # as Llama 3: prepend <|begin_of_text|>
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA3_CHAT_TEMPLATE,
              "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    with atomic_file(out / "tokenizer_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
