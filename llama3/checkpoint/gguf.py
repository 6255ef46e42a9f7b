"""GGUF checkpoints: llama.cpp's names, its metadata <-> our config, reading into our state dict, writing.
(The file format itself -- header, tensor list, block codecs -- is `gguf_file.py`.)

A GGUF file is a header, then metadata as key/value pairs (`llama.block_count = 30`,
`tokenizer.ggml.tokens = [...]`, ...), then the tensors.  Each tensor has a name
(`blk.0.attn_q.weight`), a type (F32, F16, BF16, Q8_0, Q4_1, Q4_K, ...) and a shape
listed innermost dimension first: ggml's ne[0] is the length of a row, so a GGUF
shape [576, 1536] is the torch shape [1536, 576].  Quantized types store blocks of
32 or 256 weights as small integers plus a scale (and an offset); the `gguf`
package dequantizes them back to float32 (`gguf.quants.dequantize`).

The q/k row layout, worked out once:
    Meta's checkpoints rotate adjacent channel pairs (2i, 2i+1) of each head; that
    is model.py's `apply_rope`.  Hugging Face checkpoints rotate channel i with
    i + Dh/2 instead, so their wq/wk rows are permuted.  llama.cpp's converter
    (convert_hf_to_gguf.py, `LlamaModel.permute`) takes HF rows and applies
        w.reshape(H, 2, Dh/2, D).swapaxes(1, 2).reshape(H*Dh, D)
    which sends HF row (h, half, i) to row (h, i, half) = h*Dh + 2i + half: exactly
    Meta's interleaved layout again (llama.cpp's "normal" rope mode also rotates
    adjacent pairs).  So GGUF q/k rows are already in our layout and pass through
    unchanged in both directions; transformers' GGUF loader is the one that must
    undo the permutation (`_reverse_permute_weights`).  `test_gguf.py` checks this
    numerically against transformers on the default model.

RoPE scaling: llama.cpp writes no metadata for Llama 3.1's "llama3" rope type; it
stores a `rope_freqs.weight` tensor [Dh/2] of per-pair divisors (1 for fast pairs,
`factor` for slow ones, blended between).  We turn that tensor back into a
`RopeScaling` and check that it reproduces the divisors.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from llama3.checkpoint.checks import check_fits, check_layers
from llama3.checkpoint.files import atomic_file
from llama3.checkpoint.gguf_file import GGUFFile, dequantize, open_gguf, to_torch
from llama3.config import ModelConfig, RopeScaling
from llama3.errors import CheckpointError, ConfigError, Llama3Error
from llama3.model import rope_frequencies

ARCH = "llama"

# GGUF tensor name -> our (Meta) parameter name.  Per-block names carry "blk.N." / "layers.N.".
TOP_LEVEL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",   # gate
    "ffn_up.weight": "feed_forward.w3.weight",     # up
    "ffn_down.weight": "feed_forward.w2.weight",   # down
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 RoPE scaling, turned into config.rope_scaling
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def gguf_to_meta_name(name: str) -> str | None:
    """'blk.3.ffn_gate.weight' -> 'layers.3.feed_forward.w1.weight'; None for a name we do not know."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in BLOCK_NAMES:
        return f"layers.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}"
    return None


def meta_to_gguf_name(name: str) -> str:
    """Inverse of `gguf_to_meta_name`."""
    for gguf_name, meta_name in TOP_LEVEL_NAMES.items():
        if name == meta_name:
            return gguf_name
    layer, rest = _LAYER.fullmatch(name).groups()
    return f"blk.{layer}." + next(g for g, m in BLOCK_NAMES.items() if m == rest)


# ------------------------------------------------------------------- reading
def _value(reader: GGUFFile, key: str, default=None):
    """The metadata value under `key` (int, float, str, bool or list), or `default`."""
    return reader.metadata.get(key, default)


def _float32(value: float) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it: 9.99999974738e-06 -> 1e-05."""
    if not abs(value) < 3.4e38:  # beyond float32 (or NaN): left for ModelConfig to refuse
        return float(value)
    return float(str(np.float32(value)))


_KINDS = {int: "an integer", float: "a number", str: "a string"}


def config_from_gguf(reader: GGUFFile, path: str = "") -> ModelConfig:
    """GGUF metadata (and tensor list) -> ModelConfig.  Only the "llama" architecture is
    accepted; mixture-of-experts, partial rotary and non-Llama RoPE scalings are refused.
    Every value is type-checked, the layer count checked against the blocks present and the
    size against the file before anything is built."""
    arch = _value(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: GGUF architecture is {arch!r}; only 'llama' models can be loaded")

    def get(key, default=None, required=True, kind=int):
        value = _value(reader, f"{ARCH}.{key}", default)
        if value is None and required:
            raise CheckpointError(f"{path}: GGUF metadata lacks {ARCH}.{key}; the file is incomplete")
        if isinstance(value, list):  # per-layer values (other architectures): must all be equal here
            if not value or any(isinstance(v, list) for v in value) or len(set(value)) != 1:
                raise CheckpointError(f"{path}: {ARCH}.{key} differs between layers; not a Llama 3 model")
            value = value[0]
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}[kind]
        if value is not None and value != default and not ok(value):
            raise CheckpointError(f"{path}: GGUF metadata {ARCH}.{key} = {value!r} is not "
                                  f"{_KINDS[kind]}{' above 0' if kind is int else ''}; the file is corrupt")
        return value

    if get("expert_count", 0, required=False):
        raise CheckpointError(f"{path}: this is a mixture-of-experts model "
                              f"({get('expert_count')} experts); only dense Llama models are supported")
    tensors = {t.name: t for t in reader.tensors}
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", dim // n_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{path}: key and value head sizes differ; not a Llama model")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: RoPE covers {get('rope.dimension_count')} of {head_dim} head channels; "
                              "partial rotary embeddings are not part of Llama")
    scaling_type = get("rope.scaling.type", "none", required=False, kind=str)
    if scaling_type != "none" and get("rope.scaling.factor", 1.0, required=False, kind=float) != 1.0:
        raise CheckpointError(f"{path}: RoPE scaling {scaling_type!r} is not supported (Llama 3 uses the "
                              "'llama3' scaling stored as a rope_freqs tensor)")
    vocab_size = get("vocab_size", required=False)
    if vocab_size is None:  # older files: the length of the token list, else the embedding's rows
        tokens = reader.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            vocab_size = len(tokens)
        elif "token_embd.weight" in tensors:
            vocab_size = int(tensors["token_embd.weight"].shape[-1])
        else:
            raise CheckpointError(f"{path}: GGUF file has no vocab_size, token list or token_embd.weight")
    try:
        theta = _float32(get("rope.freq_base", 10000.0, required=False, kind=float))  # llama.cpp's default base
        config = ModelConfig(
            dim=dim, n_layers=get("block_count"), n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", n_heads, required=False), vocab_size=vocab_size,
            hidden_dim=get("feed_forward_length"),
            norm_eps=_float32(get("attention.layer_norm_rms_epsilon", 1e-5, required=False, kind=float)),
            rope_theta=theta, max_seq_len=get("context_length"),
            tie_embeddings="output.weight" not in tensors, head_dim=head_dim,
        )
        if ROPE_FREQS in tensors:
            config = config.replace(rope_scaling=_rope_scaling_of(tensors[ROPE_FREQS], config, path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_layers(config, tensors, r"blk\.(\d+)\.", path, f"{ARCH}.block_count")
    check_fits(config, reader.size, 1.5, path)  # the smallest quantized types (IQ1_S) use ~1.56 bits
    return config


def _rope_scaling_of(tensor, config: ModelConfig, path: str) -> RopeScaling | None:
    """The RopeScaling a `rope_freqs.weight` tensor [Dh/2] stands for (see rope_scaling_from_divisors)."""
    if tuple(tensor.shape) != (config.head_dim // 2,):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS!r} has shape {list(tensor.shape)}; "
                              f"a head of {config.head_dim} channels needs [{config.head_dim // 2}]")
    divisors = dequantize(tensor, path).double().numpy()
    if not (np.isfinite(divisors).all() and (divisors >= 1 - 1e-6).all()):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS!r} has values below 1 or not finite; "
                              "the file is corrupt")
    return rope_scaling_from_divisors(divisors, config.rope_theta, config.head_dim, path)


def rope_divisors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """[Dh/2] how much each pair is slowed down by Llama 3.1 scaling: unscaled / scaled frequency.
    This is what llama.cpp stores as `rope_freqs.weight`."""
    plain = rope_frequencies(head_dim, theta, None).double()
    return (plain / rope_frequencies(head_dim, theta, scaling).double()).numpy()


def rope_scaling_from_divisors(divisors: np.ndarray, theta: float, head_dim: int, path: str = "") -> RopeScaling | None:
    """`rope_freqs.weight` [Dh/2] -> the RopeScaling that reproduces it (None when all are 1).

    The slowest pairs are divided by `factor` itself.  Meta's constants (low 1, high 4,
    original 8192) are tried first; otherwise the blended band is fitted: there
    1/divisor = (1 - s)/factor + s with s = (original/wavelength - low)/(high - low),
    a straight line in 1/wavelength (taking low = 1; only the ratios matter).
    """
    if np.allclose(divisors, 1.0):
        return None
    factor = float(divisors.max())
    candidates = [RopeScaling(factor=round(factor, 4))]
    freqs = rope_frequencies(head_dim, theta, None).double().numpy()
    blended = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if blended.sum() >= 2:
        s = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
        with warnings.catch_warnings():  # a badly conditioned fit is simply not a candidate
            warnings.simplefilter("ignore")
            slope, intercept = np.polyfit(freqs[blended] / (2 * np.pi), s, 1)  # s = slope/wavelength + intercept
        if intercept < 0 and np.isfinite([slope, intercept]).all():
            high = 1 - 1 / intercept
            with contextlib.suppress(ConfigError, ValueError, OverflowError):  # not a valid scaling: skipped
                candidates.append(RopeScaling(factor=round(factor, 4), low_freq_factor=1.0,
                                              high_freq_factor=round(float(high), 4),
                                              original_max_position_embeddings=round(float(slope * (high - 1)))))
    for scaling in candidates:
        if np.allclose(rope_divisors(head_dim, theta, scaling), divisors, rtol=1e-3):
            return scaling
    raise CheckpointError(f"{path}: the rope_freqs tensor does not follow Llama 3.1's RoPE scaling; "
                          "this model's RoPE variant is not supported")


def check_shape(tensor, name: str, expected: dict, path: str) -> None:
    """A GGUF tensor's shape against what the config needs, before it is dequantized."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if name not in expected:
        raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r} (not part of the model "
                              "the metadata describes)")
    if shape != expected[name]:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {list(shape)} but the config "
                              f"needs {list(expected[name])}; the metadata contradicts the weights")


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """Only the ModelConfig of a GGUF file (metadata and tensor list; no weights are read,
    except the tiny rope_freqs tensor)."""
    return config_from_gguf(open_gguf(path), str(path))


def read_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama-architecture GGUF file -> (ModelConfig, state dict with our Meta names).

    Every tensor type the `gguf` package can dequantize is accepted; the weights come
    back as `dtype` (default float32).  F32/F16/BF16 tensors already of `dtype` are views
    into the memory-mapped file (no copy); others are cast or dequantized chunk by chunk
    into their final tensors and their mapped pages released, so the peak memory is the
    finished state dict plus a few tens of MB.  The q/k rows need
    no permutation (see the module docstring).  With tied embeddings there is no
    "output.weight" in the dict.
    """
    from tqdm import tqdm

    path = str(path)
    reader = open_gguf(path, mode="c")  # copy-on-write: float tensors of the wanted dtype become parameters as they are
    from llama3.checkpoint import expected_shapes

    config = config_from_gguf(reader, path)
    expected = expected_shapes(config)
    dtype = dtype or torch.float32
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"Loading {Path(path).name}", unit="tensor", disable=None):
        if tensor.name == ROPE_FREQS:
            continue  # already folded into config.rope_scaling
        name = gguf_to_meta_name(tensor.name)
        if name is None:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is not part of a Llama 3 model "
                                  "(biases, experts and other extras are not supported)")
        check_shape(tensor, name, expected, path)
        state_dict[name] = to_torch(tensor, path, dtype)
    return config, state_dict


# ------------------------------------------------------------------- writing
FILE_TYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # numpy dtype, general.file_type (llama.cpp's enum)


def _write_hyperparameters(writer, config: ModelConfig, file_type: str) -> None:
    """The `llama.*` metadata llama.cpp reads (names as convert_hf_to_gguf.py writes them)."""
    writer.add_type("model")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.head_dim != config.dim // config.n_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(FILE_TYPES[file_type][1])
    # Llama 3.1 scaling travels as the rope_freqs tensor (see _tensors_to_write), not as
    # rope.scaling.* keys: llama.cpp would read those as linear scaling.


def _tensors_to_write(llm, file_type: str) -> list[tuple[str, torch.Tensor, np.dtype]]:
    """(GGUF name, tensor, numpy dtype to store) in llama.cpp's order.  1-D tensors (norms,
    rope_freqs) stay float32 as llama.cpp's converter keeps them; q/k rows are written as
    they are (our layout is GGUF's, see the module docstring)."""
    config = llm.config
    matrix_dtype = FILE_TYPES[file_type][0]
    out = []
    if config.rope_scaling is not None:
        divisors = rope_divisors(config.head_dim, config.rope_theta, config.rope_scaling)
        out.append((ROPE_FREQS, torch.from_numpy(divisors), np.float32))
    for name, tensor in llm.model.state_dict().items():
        if name == "output.weight" and config.tie_embeddings:
            continue  # no output.weight in the file means "tied" to llama.cpp and transformers
        out.append((meta_to_gguf_name(name), tensor, matrix_dtype if tensor.dim() > 1 else np.float32))
    return out


def _to_numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
    return tensor.detach().to("cpu", torch_dtype).contiguous().numpy()


def write_gguf(llm, path: str | os.PathLike, file_type: str = "f32") -> None:
    """Write `llm` (an LLM: model, config, tokenizer) as one GGUF file that llama.cpp loads.

    file_type: "f32" or "f16" (norms stay float32 either way).  Metadata: architecture
    llama and every hyperparameter; the tokenizer when `llm.tokenizer` can describe
    itself as a GGUF vocabulary (otherwise tokenizer.ggml.model = "no_vocab").
    Tensors are streamed one at a time to a temporary file in the same folder,
    which then replaces `path` (atomic: a crash never leaves half a file).
    """
    import gguf
    from tqdm import tqdm

    if file_type not in FILE_TYPES:
        raise Llama3Error(f"unknown GGUF file type {file_type!r}; use one of: {', '.join(FILE_TYPES)}")
    path = Path(path)
    if path.is_dir():
        raise Llama3Error(f"{path} is a folder; a GGUF export is one file, e.g. {path / 'model.gguf'}")
    tensors = _tensors_to_write(llm, file_type)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        if llm.source:
            writer.add_name(Path(str(llm.source)).stem)
        _write_hyperparameters(writer, llm.config, file_type)
        _write_tokenizer(writer, llm.tokenizer, llm.config.vocab_size, path)
        for name, tensor, dtype in tensors:
            writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(dtype),
                                   tensor.numel() * np.dtype(dtype).itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, tensor, dtype in tqdm(tensors, desc=f"Writing {path.name}", unit="tensor", disable=None):
            writer.write_tensor_data(_to_numpy(tensor, dtype))  # one tensor in memory at a time
        writer.close()


def _write_tokenizer(writer, tokenizer, vocab_size: int, path: Path) -> None:
    """The tokenizer.ggml.* keys.  A tokenizer whose `gguf_vocab()` gives a dict (model, pre,
    tokens, token_types, merges, bos_id, eos_id, pad_id, chat_template, add_bos) is written in
    full, its token list padded with unused "[PADn]" tokens up to the model's vocabulary (as
    llama.cpp's converter does); otherwise the file says it has no vocabulary, which
    llama.cpp accepts (the tokenizer then has to come from elsewhere)."""
    vocab = tokenizer.gguf_vocab() if tokenizer is not None and hasattr(tokenizer, "gguf_vocab") else None
    if vocab is None:
        writer.add_tokenizer_model("no_vocab")
        return
    tokens, types = list(vocab["tokens"]), list(vocab["token_types"])
    if len(tokens) > vocab_size:
        raise Llama3Error(f"{path}: the tokenizer has {len(tokens)} tokens but the model only {vocab_size} "
                          "embeddings; this tokenizer does not belong to this model")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [5] * (vocab_size - len(types))  # 5 = UNUSED in llama.cpp's token types
    writer.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.get("merges"):
        writer.add_token_merges(vocab["merges"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("pad_id", writer.add_pad_token_id)):
        if vocab.get(key) is not None:
            add(vocab[key])
    if vocab.get("add_bos") is not None:
        writer.add_add_bos_token(vocab["add_bos"])
    if vocab.get("chat_template"):
        writer.add_chat_template(vocab["chat_template"])
