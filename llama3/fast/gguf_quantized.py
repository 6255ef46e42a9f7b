"""Load a GGUF file straight into an int8 or int4 model: quantized blocks never become a float matrix.

`llama3.load` dequantizes every tensor to float (538 MB for SmolLM2-135M in fp32);
quantizing that afterwards needs the float model in memory first.  Here each
weight goes from its blocks to a quantized linear directly:

    int8   Q8_0 blocks -> Int8Linear, exactly the file's int8 groups (`int8_from_q8_0`);
           Q4_1 blocks -> Int8Linear with offsets, exactly the file's 4-bit weights (`int8_from_q4_1`);
           any other type dequantized, then int8 per 32 weights
    int4   Q4_0 / Q4_1 blocks -> Int4Linear, exactly the file's 4-bit weights (`int4_from_q4_1`);
           the output head (and the token table it may share) -> bfloat16 (`Bf16Head`)

The blocks are decoded by the GGUF reader (`checkpoint/gguf_blocks.py`); this module only
turns them into the kernels' layouts.  Only the norms (and any tensor stored as float) are read
as float; a linear stored in another type is dequantized and quantized on its own.  With tied
embeddings, the token table reads the head's rows (`Int8Embedding` / `Bf16Embedding`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from llama3.errors import CheckpointError
from llama3.fast.int4 import Int4Linear, fits_int4, int4_from_q4_0, int4_from_q4_1, quantize_groups, set_bf16_head
from llama3.fast.quantize import Int8Embedding, Int8Linear, int8_from_q4_1, int8_from_q8_0, quantize_int8_groups
from llama3.model import Transformer


def _quantized_linear(tensor, path: str, kind: str) -> nn.Module:
    """One GGUF 2-D tensor -> Int4Linear (kind "int4", where the shape allows) or Int8Linear,
    from the file's blocks directly when their type matches, else via float."""
    from gguf import GGMLQuantizationType as T

    from llama3.checkpoint.gguf_file import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))   # GGUF lists the row length first
    if kind == "int4" and fits_int4(shape):
        if tensor.tensor_type == T.Q4_1:
            return Int4Linear(*int4_from_q4_1(tensor.data, shape))
        if tensor.tensor_type == T.Q4_0:
            return Int4Linear(*int4_from_q4_0(tensor.data, shape))
        return Int4Linear(*quantize_groups(dequantize(tensor, path)))
    if tensor.tensor_type == T.Q8_0:
        return Int8Linear(*int8_from_q8_0(tensor.data, shape))
    if tensor.tensor_type == T.Q4_1:
        return Int8Linear(*int8_from_q4_1(tensor.data, shape))
    return Int8Linear(*quantize_int8_groups(dequantize(tensor, path)))


def load_gguf_quantized(path: str | os.PathLike, kind: str = "int8", dtype: torch.dtype | None = None):
    """A .gguf file -> `LLM` whose block linears are Int8Linear or Int4Linear (kind "int8" / "int4"),
    whose head is int8 (int4: bfloat16), and whose norms (and an untied token table) are in `dtype`,
    default float32."""
    from llama3.checkpoint import _find_tokenizer
    from llama3.checkpoint.checks import check_finite
    from llama3.checkpoint.gguf import ROPE_FREQS, config_from_gguf, gguf_to_meta_name
    from llama3.checkpoint.gguf_file import dequantize, open_gguf
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
        head = name == "output.weight" or (name == "tok_embeddings.weight" and config.tie_embeddings)
        if head and kind == "int4":                          # the head stays 16-bit beside int4 blocks
            head_weight = dequantize(tensor, path, torch.bfloat16)  # straight to bf16: no float32 copy
            set_bf16_head(model, head_weight, dtype, tied=name == "tok_embeddings.weight")
        elif head:
            int8 = _quantized_linear(tensor, path, "int8")
            model.output = int8
            if name == "tok_embeddings.weight":              # tied: one int8 table for embedding and head
                model.tok_embeddings = Int8Embedding(int8, dtype)
        elif isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent_name), child, _quantized_linear(tensor, path, kind))
        else:
            setattr(module, attr, nn.Parameter(dequantize(tensor, path, dtype), requires_grad=False))
        loaded.add(name)
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise CheckpointError(f"{path}: the file lacks tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    check_finite([*model.named_parameters(), *model.named_buffers()], path)
    return LLM(model=model.eval(), config=config, tokenizer=_find_tokenizer(path), source=path)
