"""llama3: the Llama 3 model family from scratch in PyTorch.

    import llama3
    llm = llama3.load()                       # the embedded SmolLM2-135M-Instruct
    llm = llama3.load("path/to/hf-folder")    # or a Meta folder, or a .gguf file
    logits = llm.model(tokens)                # [B, T] -> [B, T, V]

The names below are imported on first use (PEP 562), so `import llama3` and the
`llama3` command's --help do not pay for importing torch.
"""

import importlib
import os
import sys

# PyTorch's OpenMP threads (libgomp) spin ~8 ms after every parallel region before they sleep
# (GOMP_SPINCOUNT's default, 300,000 turns, measured here).  Decoding runs the C++ kernels on their
# own pool (llama3/fast/threads.cpp), whose worker then shares its core with a spinning OpenMP
# thread: one ATen operator over 32,768 elements a token (a logits copy, a sampling step) is
# enough, and bf16 decoding fell from 64 to 44 tokens/s on a 2-core Zen 4.  10,000 turns (~0.3 ms)
# still bridge the back-to-back regions of a prompt's matrix products.  libgomp reads this once, when
# torch is first imported: it is set only if torch is not imported yet and the user set neither.
if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

# PyTorch's allocations of 2 MiB or more in 2 MiB pages (THP_MEM_ALLOC_ENABLE: c10 aligns them and
# asks the kernel for transparent huge pages, where /sys/kernel/mm/transparent_hugepage/enabled is
# "madvise" or "always").  Every decoded token streams all the weights: in 4 KiB pages that is a TLB
# miss, and a hardware prefetcher stopping, every 4 KiB.  Measured on a 2-core Zen 4 (`llama3 bench`,
# 7 alternating rounds, BENCHMARKS.md 2026-12-03 13:15): decode faster in 6 of 7 rounds in float32
# (median 39.9 vs 37.2 tok/s) and 5 of 7 in int4 (111.7 vs 99.9), prefill +12%, peak memory the same.
# c10 reads it once; set only before torch is imported and if the user did not set it.
if "torch" not in sys.modules and "THP_MEM_ALLOC_ENABLE" not in os.environ:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "llama3.llm", "load": "llama3.llm",
    "ModelConfig": "llama3.config", "RopeScaling": "llama3.config", "PRESETS": "llama3.config",
    "get_preset": "llama3.config",
    "Transformer": "llama3.model", "KVCache": "llama3.model",
    "Llama3Error": "llama3.errors",
}

__all__ = [*_EXPORTS, "load_tokenizer"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'llama3' has no attribute {name!r}")


def load_tokenizer(source=None):
    """The tokenizer of `source` (None: Meta's Llama 3 tokenizer). See llama3.tokenizer."""
    from llama3.tokenizer import load_tokenizer as _load

    return _load(source)
