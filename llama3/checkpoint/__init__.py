"""Checkpoints: read and write Hugging Face folders, Meta folders and GGUF files.

    detect_format(path)                 -> "hf" | "meta" | "gguf"
    load_checkpoint(path, dtype, device) -> LLM (model + config + tokenizer or None)
    save_checkpoint(llm, path, format)  atomic; "hf" | "meta" | "gguf"
    build_model(config, state_dict)     -> Transformer, strictly checked

Each format has its own module (hf.py, meta.py, gguf.py) that turns files into
`(ModelConfig, state_dict)` with our parameter names (= Meta's) and back.
This module only dispatches and builds the model.

Memory: the model is created on PyTorch's `meta` device (shapes, no storage)
and each checkpoint tensor is then put in place of its parameter, so no
randomly initialised copy is ever allocated.  The readers memory-map the files:
a tensor kept at its stored dtype is a view into the mapping (the file's pages
are the parameter), and one that is cast, permuted, merged or dequantized is
copied and its mapped pages released at once (`files.release_pages`).  So a
load never holds two copies of the weights: its peak RSS growth is about the
larger of the file and the loaded weights (`benchmarks/load_memory.py`
measures it: 0.2-1.1x; a bfloat16 file loaded as the default float32 is 2x the
file, as the weights themselves are).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from llama3.checkpoint.checks import check_finite, naming
from llama3.config import ModelConfig
from llama3.errors import CheckpointError
from llama3.model import Transformer

FORMATS = ("hf", "meta", "gguf")


def detect_format(path: str | os.PathLike) -> str:
    """What kind of checkpoint `path` is: "hf", "meta" or "gguf".

    A .gguf file (or any file starting with the GGUF magic) is "gguf"; a folder
    with config.json and safetensors weights is "hf"; a folder with params.json
    and consolidated.NN.pth is "meta".  HF wins when a folder has both.
    """
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix.lower() == ".gguf":
            return "gguf"
        raise CheckpointError(f"{path}: not a GGUF file; pass a .gguf file, or the folder that holds "
                              "config.json (Hugging Face) or params.json (Meta)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors*")):
        return "hf"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file():
        return "hf"  # read_hf says which weight file is missing
    if (path / "params.json").is_file():
        return "meta"
    hint = ""
    if (path / "original" / "params.json").is_file():
        hint = f"; Meta weights are in {path / 'original'}: pass that folder"
    raise CheckpointError(f"{path}: neither a Hugging Face folder (config.json + *.safetensors) nor a "
                          f"Meta folder (params.json + consolidated.00.pth){hint}")


def read_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state dict with our names) from any format; dtype None keeps the stored types."""
    with naming(path):
        return _read_checkpoint(path, dtype)


def _read_checkpoint(path, dtype) -> tuple[ModelConfig, dict]:
    fmt = detect_format(path)
    if fmt == "hf":
        from llama3.checkpoint.hf import read_hf

        return read_hf(path, dtype=dtype)
    if fmt == "meta":
        from llama3.checkpoint.meta import read_meta

        return read_meta(path, dtype=dtype)
    return _gguf_module().read_gguf(path, dtype=dtype)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Only the configuration of a checkpoint, reading as little as the format allows
    (config.json alone for HF; params.json plus tensor shapes, memory-mapped, for Meta)."""
    with naming(path):
        return _read_config(path)


def _read_config(path) -> ModelConfig:
    fmt = detect_format(path)
    if fmt == "hf":
        from llama3.checkpoint.hf import read_hf_config

        return read_hf_config(Path(path))
    if fmt == "meta":
        from llama3.checkpoint.meta import read_meta_config

        return read_meta_config(path)
    gguf = _gguf_module()
    if hasattr(gguf, "read_gguf_config"):
        return gguf.read_gguf_config(path)
    return gguf.read_gguf(path)[0]


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None):
    """Load a checkpoint -> `llama3.llm.LLM` with its tokenizer (None when the folder has none).

    dtype: None -> float32, whatever the file stores (bfloat16 weights are widened
    exactly; pass torch.bfloat16 to keep half the memory).  "auto" keeps the
    checkpoint's own floating type (the type of its token embedding).
    device: where the weights go (default CPU).
    """
    from llama3.llm import LLM, parse_device, parse_dtype

    device = parse_device(device)
    if dtype != "auto":
        dtype = parse_dtype(dtype)
    config, state = read_checkpoint(path, dtype=None if dtype == "auto" else (dtype or torch.float32))
    with naming(path):
        check_finite(state.items(), str(path))
        if dtype == "auto":
            embedding = state.get("tok_embeddings.weight")
            dtype = embedding.dtype if embedding is not None and embedding.is_floating_point() else torch.float32
        model = build_model(config, state, dtype=dtype, device=device)
        del state
        tokenizer = _find_tokenizer(path)
    return LLM(model=model, config=config, tokenizer=tokenizer, source=str(path))


def save_checkpoint(llm, path: str | os.PathLike, format: str = "hf") -> None:
    """Write `llm` as a HF folder, a Meta folder or one GGUF file; atomically.

    "hf" and "meta" folders include the tokenizer when `llm.tokenizer` is set, so
    `llama3.load(path)` gets it back.
    """
    if format == "hf":
        from llama3.checkpoint.hf import write_hf

        write_hf(llm, path)
    elif format == "meta":
        from llama3.checkpoint.meta import write_meta

        write_meta(llm, path)
    elif format == "gguf":
        # GGUF stores F32 or F16: a 16-bit model is written as F16, anything else as F32.
        file_type = "f16" if llm.dtype in (torch.float16, torch.bfloat16) else "f32"
        _gguf_module().write_gguf(llm, path, file_type=file_type)
    else:
        raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of a `config` model -> its shape (a tied head is not listed twice)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> Transformer:
    """A Transformer holding exactly the tensors of `state_dict` (our names, e.g. `layers.0.attention.wq.weight`).

    Strict: a missing, unexpected or wrongly shaped tensor raises CheckpointError
    naming it.  A tied config expects no `output.weight`.  The tensors become the
    parameters themselves (cast to dtype/moved to device only when asked), so no
    second copy of the weights is made.  dtype None keeps the tensors' dtype.
    """
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        why = " (the config ties the output head to the embedding)" if unexpected == ["output.weight"] else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r}{why}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(got)} but the config needs {list(shape)}; "
                                  "the config contradicts the weights")
    for name in expected:
        tensor = state_dict[name]
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}; expected floating-point weights")
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor.to(device=device, dtype=dtype)))
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def _find_tokenizer(path):
    """The tokenizer stored with a checkpoint (tokenizer.model / tokenizer.json / GGUF vocabulary), or None."""
    from llama3.tokenizer import find_tokenizer

    return find_tokenizer(path)


def _gguf_module():
    try:
        from llama3.checkpoint import gguf
    except ModuleNotFoundError as e:
        if e.name == "llama3.checkpoint.gguf":
            raise CheckpointError("GGUF support is not installed in this build (llama3/checkpoint/gguf.py)") from None
        raise
    return gguf
