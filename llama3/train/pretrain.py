"""Pretraining from scratch: data -> tokenizer -> shards -> a tiny Llama 3 -> a model folder.

    from llama3.train import TrainConfig, pretrain
    pretrain(TrainConfig(out="kjv-model"))          # the default corpus and tiny-cpu preset
    llm = llama3.load("kjv-model")                  # it is an ordinary model folder

OUT ends up holding:
    config.json, model.safetensors, tokenizer files   the model folder (`LLM.save(format="hf")`)
    data/                                             the prepared shards (+ the tokenizer trained for them)
    checkpoints/                                      training checkpoints, for --resume
    metrics.jsonl, loss.png, train_config.json        what happened
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama3.checkpoint.files import atomic_file
from llama3.config import get_preset
from llama3.errors import Llama3Error
from llama3.llm import LLM
from llama3.model import Transformer
from llama3.train.checkpointing import full_model_state
from llama3.train.config import TrainConfig
from llama3.train.corpus import CORPUS_NAME, default_corpus_documents
from llama3.train.data import (TokenShards, TokenWindows, fingerprint, is_prepared, iter_documents, prepare,
                               read_manifest)
from llama3.train.distributed import Dist, barrier, broadcast_object, init_distributed, shutdown
from llama3.train.run_folder import prepare_out_folder
from llama3.train.trainer import TrainResult, train_loop


def prepare_training_data(cfg: TrainConfig, d: Dist, progress: bool = True):
    """-> (prepared data folder, tokenizer).  cfg.data.source may be a prepared folder (used as is), raw
    text/JSONL/folder, or None (the default corpus); raw data is prepared into OUT/data by rank 0,
    with cfg.data.tokenizer or else a byte-level BPE of cfg.data.vocab_size trained on that data."""
    from llama3.tokenizer import load_tokenizer

    if cfg.data.source is not None and is_prepared(cfg.data.source):
        return Path(cfg.data.source), load_tokenizer(cfg.data.tokenizer or cfg.data.source)
    data_dir = Path(cfg.out) / "data"
    if cfg.data.source is None:
        documents, source_id = default_corpus_documents, CORPUS_NAME
    else:
        documents, source_id = (lambda: iter_documents(cfg.data.source)), fingerprint(cfg.data.source)
    if d.is_main:
        if cfg.data.tokenizer:
            tokenizer, tokenizer_id = load_tokenizer(cfg.data.tokenizer), str(cfg.data.tokenizer)
        else:
            from llama3.train.bpe import train_bpe

            tokenizer_id = f"byte-level BPE, {cfg.data.vocab_size} tokens"
            old = read_manifest(data_dir)
            reusable = (old is not None and is_prepared(data_dir) and old["settings"]["source"] == source_id
                        and old["settings"]["tokenizer"] == tokenizer_id)
            if not reusable:
                train_bpe(documents(), cfg.data.vocab_size, data_dir, progress=progress)
            tokenizer = load_tokenizer(data_dir)
        prepare(cfg.data.source, data_dir, tokenizer, tokenizer_id, cfg.data.val_fraction, documents=documents(),
                source_id=source_id, progress=progress)
    barrier(d)
    return data_dir, load_tokenizer(cfg.data.tokenizer or data_dir)


def build_model(cfg: TrainConfig, vocab_size: int) -> Transformer:
    """A freshly initialised model of cfg.preset's shape, its vocabulary the tokenizer's;
    or, with cfg.model, that model's weights (continued pretraining)."""
    if cfg.model:
        from llama3.llm import load

        model = load(cfg.model, dtype="float32").model
        if model.config.vocab_size < vocab_size:
            raise Llama3Error(f"{cfg.model} has {model.config.vocab_size} token embeddings but the tokenizer "
                              f"{vocab_size} tokens; prepare the data with that model's tokenizer")
        return model.train()
    preset = get_preset(cfg.preset)
    config = preset.replace(vocab_size=vocab_size, max_seq_len=max(preset.max_seq_len, cfg.data.seq_len))
    return Transformer(config).init_weights(seed=cfg.seed)


def save_model_folder(wrapped, config, tokenizer, out: Path, d: Dist, lora=None) -> None:
    """Gather the full weights (collective) and, on rank 0, write OUT as a model folder
    (with `lora`, a LoRAConfig, the adapters are merged into the weights first)."""
    from llama3.train.lora import apply_lora, merge_lora

    state = full_model_state(wrapped)
    if d.is_main:
        with torch.device("meta"):
            plain = Transformer(config)
            if lora is not None:
                apply_lora(plain, lora)
        plain.load_state_dict(state, assign=True, strict=True)
        if lora is not None:
            merge_lora(plain)
        if config.tie_embeddings:
            plain.output.weight = plain.tok_embeddings.weight
        LLM(plain, config, tokenizer).save(out, format="hf")
    barrier(d)


def sample_text(folder: Path, prompt: str, max_new_tokens: int = 60, seed: int = 0) -> str:
    """Load the written model folder back and continue `prompt` (temperature 0.8, top-k 40)."""
    from llama3.llm import load

    return prompt + load(folder).generate(prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=seed)


def pretrain(cfg: TrainConfig) -> TrainResult:
    """Run a whole pretraining job (every process of a torchrun job calls this)."""
    if cfg.model and not cfg.data.tokenizer:  # continued pretraining: the model's own tokenizer
        cfg = cfg.replace(tokenizer=cfg.model)
    from llama3.extras import require

    require("train", "training", None if cfg.data.source is None else ["matplotlib"])  # loss.png (+ the corpus)
    d = init_distributed(cfg.parallel.device)
    try:
        out = Path(cfg.out)
        prepare_out_folder(out, cfg.resume, cfg.overwrite, d.is_main)  # never silently replace an earlier run
        barrier(d)
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / "train_config.json") as tmp:
                tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        data_dir, tokenizer = prepare_training_data(cfg, d, progress=cfg.progress and d.is_main)
        train_set = TokenWindows(TokenShards(data_dir, "train"), cfg.data.seq_len)
        val_set = TokenWindows(TokenShards(data_dir, "val"), cfg.data.seq_len)
        model = build_model(cfg, tokenizer.vocab_size).to(d.device)
        if d.is_main:
            n = sum(p.numel() for p in model.parameters())
            print(f"model: {cfg.preset}, {n / 1e6:.2f}M parameters; data: {len(train_set.shards):,} training "
                  f"tokens in {len(train_set):,} windows of {cfg.data.seq_len}", flush=True)
        wrapped, result = train_loop(model, cfg, train_set, val_set, d)
        save_model_folder(wrapped, model.config, tokenizer, out, d)
        if d.is_main and cfg.sample_prompt is not None:
            print("sample:", sample_text(out, cfg.sample_prompt, seed=cfg.seed), flush=True)
        return broadcast_object(result, d)
    finally:
        shutdown()
