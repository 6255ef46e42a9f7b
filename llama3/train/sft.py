"""Supervised fine-tuning on chat data: the model learns to write the assistant's turns.

    llama3 sft --model SOURCE --data chats.jsonl --out DIR [--lora-rank 8]

chats.jsonl holds one conversation per line:
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

Each conversation is rendered with the model's own chat template
(`tokenizer.encode_chat`), and the loss counts only the tokens of assistant
turns, including the token that ends each turn (<|eot_id|>, <|im_end|>), so the
model learns to stop.  The span of assistant turn i is found by rendering
prefixes: it runs from the end of  encode_chat(messages[:i], add_generation_prompt=True)
to the end of  encode_chat(messages[:i+1]).

Packing: short examples are laid end to end in rows of seq_len tokens.  The
attention mask is block-diagonal (causal inside each example, nothing across
examples) and the RoPE positions restart at 0 for every example, so a packed
example is computed exactly as it would be alone:

    row:        [ ex1 ex1 ex1 | ex2 ex2 | pad ]
    positions:  [  0   1   2  |  0   1  |  0  ]
    mask [T, T]: row i may see column j  iff  same example and j <= i
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from llama3.errors import Llama3Error
from llama3.train.config import TrainConfig
from llama3.train.data import Batch, DataError, read_jsonl
from llama3.train.lora import LoRAConfig, apply_lora, save_adapter

IGNORE = -100  # target value that contributes no loss


# ------------------------------------------------------------ reading and tokenizing
def read_chats(path: str | os.PathLike) -> list[list[dict]]:
    """The conversations of a JSONL file; a malformed line raises DataError naming the line."""
    from llama3.tokenizer.chat import validate_messages

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --data with a .jsonl file of {{\"messages\": [...]}} lines")
    chats = []
    for number, messages in read_jsonl(path, "messages"):
        try:
            messages = validate_messages(messages)
        except Llama3Error as e:
            raise DataError(f"{path}:{number}: {e}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{number}: the conversation has no assistant message, so nothing to learn")
        chats.append(messages)
    if not chats:
        raise DataError(f"{path}: no conversations found (the file is empty)")
    return chats


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """-> (ids, trainable): the whole conversation and, per token, whether it belongs to an assistant turn."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    trainable = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.encode_chat(messages[:i], add_generation_prompt=True) if i else []
        end = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if ids[:len(start)] != start or ids[:len(end)] != end:
            raise Llama3Error("this chat template does not render conversations prefix by prefix, so the "
                              "assistant turns cannot be located; use a model with a standard template")
        trainable[len(start):len(end)] = [True] * (len(end) - len(start))
    return ids, trainable


def to_example(ids: list[int], trainable: list[bool]) -> tuple[list[int], list[int]]:
    """Next-token pairs: inputs ids[:-1], targets ids[1:] where that target is trainable, else IGNORE."""
    return ids[:-1], [t if keep else IGNORE for t, keep in zip(ids[1:], trainable[1:])]


# ------------------------------------------------------------ packing
class PackedChats:
    """Examples laid into rows of seq_len tokens; `batch(rows)` gives tokens, targets, positions and mask."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool = True):
        self.seq_len, self.truncated = seq_len, 0
        rows: list[list[tuple[list[int], list[int]]]] = []
        used = seq_len  # forces a new row for the first example
        for inputs, targets in examples:
            if len(inputs) > seq_len:
                inputs, targets = inputs[:seq_len], targets[:seq_len]
                self.truncated += 1
            if not pack or used + len(inputs) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append((inputs, targets))
            used += len(inputs)
        T = seq_len
        self.tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)    # [N, T]
        self.targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)   # [N, T]
        self.positions = torch.zeros((len(rows), T), dtype=torch.long)        # [N, T]
        self.doc = torch.full((len(rows), T), -1, dtype=torch.long)           # [N, T] example number in its row
        for r, row in enumerate(rows):
            at = 0
            for k, (inputs, targets) in enumerate(row):
                n = len(inputs)
                self.tokens[r, at:at + n] = torch.tensor(inputs)
                self.targets[r, at:at + n] = torch.tensor(targets)
                self.positions[r, at:at + n] = torch.arange(n)
                self.doc[r, at:at + n] = k
                at += n
            self.positions[r, at:] = torch.arange(T - at)  # padding: its own block, no loss

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: list[int]) -> Batch:
        doc = self.doc[indices]                                              # [B, T]
        same = doc.unsqueeze(2) == doc.unsqueeze(1)                          # [B, T, T]: same example
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()  # [T, T]: j <= i
        return Batch(tokens=self.tokens[indices], targets=self.targets[indices],
                     positions=self.positions[indices], mask=(same & causal).unsqueeze(1))  # mask [B, 1, T, T]


def build_chat_sets(chats: list[list[dict]], tokenizer, seq_len: int, val_fraction: float, pack: bool):
    """-> (train PackedChats, val PackedChats or None): every 1/val_fraction-th conversation is held out
    when there are at least 20."""
    examples = [to_example(*tokenize_chat(tokenizer, m)) for m in chats]
    every = max(2, round(1 / val_fraction))
    is_val = [len(examples) >= 20 and i % every == every - 1 for i in range(len(examples))]
    train = [e for e, v in zip(examples, is_val) if not v]
    held = [e for e, v in zip(examples, is_val) if v]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    val = PackedChats(held, seq_len, pad, pack) if held else None
    return PackedChats(train, seq_len, pad, pack), val


# ------------------------------------------------------------ the job
def lora_config(cfg: TrainConfig) -> LoRAConfig | None:
    if not cfg.lora.rank:
        return None
    targets = [t.strip() for t in cfg.lora.targets.split(",") if t.strip()]
    return LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=targets,
                      base_model=cfg.model)


def steps_for_epochs(epochs: float, rows: int, cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps that make `epochs` passes over `rows` training rows (at least 1)."""
    per_step = cfg.data.batch_size * cfg.data.grad_accum * world_size
    return max(1, math.ceil(epochs * rows / per_step))


def finetune(cfg: TrainConfig, merge: bool = False, epochs: float | None = None):
    """Fine-tune cfg.model on the chats in cfg.data.source; write OUT (a model folder, or a LoRA adapter folder,
    plus the merged model folder when `merge`).  Every process of a torchrun job calls this.
    epochs: when given, cfg.schedule.steps becomes the steps of that many passes over the packed training rows."""
    from llama3.llm import load
    from llama3.train.checkpointing import full_model_state
    from llama3.train.distributed import barrier, broadcast_object, init_distributed, shutdown
    from llama3.train.pretrain import save_model_folder
    from llama3.train.run_folder import prepare_out_folder
    from llama3.train.trainer import train_loop

    from llama3.extras import require

    require("train", "fine-tuning", ["matplotlib"])  # loss.png
    if epochs is not None and not epochs > 0:
        raise Llama3Error(f"--epochs {epochs}: give a positive number of passes over the data")
    if cfg.data.source is None:
        raise DataError("--data is required: a .jsonl file with one {\"messages\": [...]} conversation per line")
    d = init_distributed(cfg.parallel.device)
    try:
        chats = read_chats(cfg.data.source)  # bad data fails first, before the slow model load
        prepare_out_folder(cfg.out, cfg.resume, cfg.overwrite, d.is_main)  # never silently replace an earlier run
        barrier(d)
        llm = load(cfg.model)
        if llm.tokenizer is None:
            raise Llama3Error(f"{cfg.model}: has no tokenizer, so its chat format is unknown")
        seq_len = min(cfg.data.seq_len, llm.config.max_seq_len)
        train_set, val_set = build_chat_sets(chats, llm.tokenizer, seq_len, cfg.data.val_fraction, cfg.data.pack)
        if epochs is not None:
            cfg = cfg.replace(steps=steps_for_epochs(epochs, len(train_set), cfg, d.world_size))
        per_step = cfg.data.batch_size * cfg.data.grad_accum * d.world_size
        if len(train_set) < per_step and d.is_main:
            print(f"warning: {cfg.data.source} packs into {len(train_set)} training row(s) of {seq_len} tokens, "
                  f"fewer than one batch of {per_step}: each step repeats them, and one epoch is "
                  f"{cfg.schedule.steps} step(s); add examples, or pass --epochs N or --steps N to train longer",
                  file=sys.stderr, flush=True)
        lora = lora_config(cfg)
        model = llm.model.to(device=d.device, dtype=torch.float32)
        if lora:
            apply_lora(model, lora)
        if d.is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            print(f"{len(train_set)} rows of {seq_len} tokens ({train_set.truncated} examples truncated); "
                  f"training {trainable:,} of {total:,} parameters" + (f" (LoRA rank {lora.rank})" if lora else ""),
                  flush=True)
        wrapped, result = train_loop(model, cfg, train_set, val_set, d,
                                     extra_state={"lora": asdict(lora) if lora else None})
        out = Path(cfg.out)
        if lora is None:
            save_model_folder(wrapped, llm.config, llm.tokenizer, out, d)
        else:
            state = full_model_state(wrapped)
            if d.is_main:
                save_adapter(model, lora, out, {k: v for k, v in state.items() if k.endswith(("lora_a", "lora_b"))})
            barrier(d)
            if merge:
                save_model_folder(wrapped, llm.config, llm.tokenizer, out, d, lora=lora)
        return broadcast_object(result, d)
    finally:
        shutdown()
