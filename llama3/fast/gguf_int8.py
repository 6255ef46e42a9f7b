"""Load a GGUF file straight into an int8 model: Q8_0 tensors never become a float matrix.

`llama3.load` dequantizes every tensor to float (538 MB for SmolLM2-135M in fp32);
quantizing that afterwards needs the float model in memory first.  Here each
Q8_0 weight goes from its blocks to an `Int8Linear` one row at a time
(`int8_from_q8_0`); only the norms (and any tensor stored as float) are read as
float.  Linears stored in another type are dequantized and quantized one by one.
With tied embeddings, the token table is the int8 head read through `Int8Embedding`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from llama3.errors import CheckpointError
from llama3.fast.quantize import Int8Embedding, Int8Linear, int8_from_q8_0
from llama3.model import Transformer


def _int8_of(tensor, path: str) -> Int8Linear:
    """One GGUF 2-D tensor -> Int8Linear, from Q8_0 blocks directly or via float for other types."""
    from gguf import GGMLQuantizationType

    from llama3.checkpoint.gguf import _dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))   # GGUF lists the row length first
    if tensor.tensor_type == GGMLQuantizationType.Q8_0:
        return Int8Linear(*int8_from_q8_0(tensor.data, shape))
    from llama3.fast.quantize import quantize_rows

    return Int8Linear(*quantize_rows(_dequantize(tensor, path)))


def load_gguf_int8(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """A .gguf file -> `LLM` whose linears are Int8Linear (norms in `dtype`, default float32)."""
    from llama3.checkpoint import _find_tokenizer
    from llama3.checkpoint.gguf import ROPE_FREQS, _dequantize, config_from_gguf, gguf_to_meta_name, open_gguf
    from llama3.llm import LLM

    path, dtype = str(path), dtype or torch.float32
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    with torch.device("meta"):                               # shapes only; every tensor is replaced below
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded = set()
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        name = gguf_to_meta_name(tensor.name)
        if name not in expected:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is not part of this Llama 3 model")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {list(shape)} but the config "
                                  f"needs {list(expected[name])}")
        module_name, _, attr = name.rpartition(".")
        parent_name, _, child = module_name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) or (name == "tok_embeddings.weight" and config.tie_embeddings):
            int8 = _int8_of(tensor, path)
            if name == "tok_embeddings.weight":              # tied: one int8 table for embedding and head
                model.output = int8
                model.tok_embeddings = Int8Embedding(int8, dtype)
            else:
                setattr(model.get_submodule(parent_name), child, int8)
        else:
            setattr(module, attr, nn.Parameter(_dequantize(tensor, path, dtype), requires_grad=False))
        loaded.add(name)
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise CheckpointError(f"{path}: the file lacks tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return LLM(model=model.eval(), config=config, tokenizer=_find_tokenizer(path), source=path)
