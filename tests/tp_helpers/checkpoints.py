"""Tiny checkpoints for the tensor-parallel tests, written by the test process before torchrun starts
(so the ranks' memory holds only what loading costs): the same random model as HF, Meta with 1, 2 or 4
shards, GGUF F32 and GGUF Q8_0.

The Meta shards are cut here the way Meta's fairscale layers store them (ColumnParallelLinear: wq wk wv
w1 w3 and output by rows; RowParallelLinear: wo w2 by columns; VocabParallelEmbedding by rows; norms
whole in every shard), written independently of llama3.checkpoint.meta's own table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama3.config import ModelConfig
from llama3.llm import LLM
from llama3.model import Transformer

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")   # split by rows in Meta's shards
ROW_PARALLEL = ("wo", "w2")                                                   # split by columns

CONFIGS = {   # GQA with an untied head; MHA with a tied one (Q8_0 needs rows of multiples of 32)
    "gqa-untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                       max_seq_len=64, tie_embeddings=False),
    "mha-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, hidden_dim=96,
                     max_seq_len=64, tie_embeddings=True),
}
MEDIUM = dict(dim=384, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=8192, hidden_dim=1536,
              max_seq_len=64, tie_embeddings=False)   # 15M parameters, 60 MB float32: for resident memory


def random_model(config: ModelConfig, seed: int) -> Transformer:
    """Weights large enough (std 0.3) that the logits are far apart: greedy tokens do not hinge on rounding."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def write_meta_shards(model: Transformer, config: ModelConfig, folder: Path, shards: int) -> None:
    from llama3.checkpoint.meta import config_to_meta

    folder.mkdir(parents=True)
    state = {name: w.detach().clone() for name, w in model.state_dict().items()}
    state["output.weight"] = state.get("output.weight", state["tok_embeddings.weight"]).clone()
    for k in range(shards):
        piece = {}
        for name, w in state.items():
            kind = name.split(".")[-2]
            dim = 0 if kind in COLUMN_PARALLEL else 1 if kind in ROW_PARALLEL else None
            piece[name] = w if dim is None else w.chunk(shards, dim=dim)[k].clone()
        torch.save(piece, folder / f"consolidated.{k:02d}.pth")
    (folder / "params.json").write_text(json.dumps(config_to_meta(config)))


def write_q8_0(source: Path, target: Path) -> None:
    """The F32 GGUF with every matrix stored as Q8_0 by the gguf package's own quantizer."""
    import gguf
    from test_gguf import rewrite_matrices  # tests/ is on the path (pytest's rootdir)

    rewrite_matrices(source, target, gguf.GGMLQuantizationType.Q8_0)


def write_all(root: Path) -> dict[str, str]:
    """{case name: path}: every config in every format, and the medium model as HF."""
    paths = {}
    for name, fields in CONFIGS.items():
        config = ModelConfig(**fields)
        llm = LLM(random_model(config, seed=len(name)), config)
        llm.save(root / f"{name}-hf", format="hf")
        llm.save(root / f"{name}.gguf", format="gguf")
        write_q8_0(root / f"{name}.gguf", root / f"{name}-q8_0.gguf")
        write_meta_shards(llm.model, config, root / f"{name}-meta2", 2)
        paths.update({f"{name}/hf": f"{name}-hf", f"{name}/q8_0": f"{name}-q8_0.gguf",
                      f"{name}/meta2": f"{name}-meta2"})
        if not config.tie_embeddings:  # the float GGUF view and the one-shard Meta read: one config is enough
            llm.save(root / f"{name}-meta1", format="meta")
            paths.update({f"{name}/gguf": f"{name}.gguf", f"{name}/meta1": f"{name}-meta1"})
        if config.n_kv_heads % 4 == 0:   # 4 shards over 2 ranks: each rank takes two whole pieces
            write_meta_shards(llm.model, config, root / f"{name}-meta4", 4)
            paths[f"{name}/meta4"] = f"{name}-meta4"
    from llama3.tokenizer import load_tokenizer
    from llama3.train.bpe import train_bpe

    texts = ["the lazy fox ran over the quick dog", "def f(x):\n    return x * 2", "split every layer in two"]
    tokenizer = load_tokenizer(train_bpe(texts, 300, root / "tokenizer", progress=False))
    config = ModelConfig(**{**CONFIGS["gqa-untied"], "vocab_size": tokenizer.vocab_size})
    LLM(random_model(config, seed=7), config, tokenizer=tokenizer).save(root / "cli-hf", format="hf")
    paths["cli"] = "cli-hf"
    medium = ModelConfig(**MEDIUM)
    LLM(random_model(medium, seed=5), medium).save(root / "medium-hf", format="hf")
    paths["medium"] = "medium-hf"
    return {case: str(root / p) for case, p in paths.items()}
