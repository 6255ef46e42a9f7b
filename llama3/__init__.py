"""llama3: the Llama 3 model family from scratch in PyTorch.

    import llama3
    llm = llama3.load()                       # the embedded SmolLM2-135M-Instruct
    llm = llama3.load("path/to/hf-folder")    # or a Meta folder, or a .gguf file
    logits = llm.model(tokens)                # [B, T] -> [B, T, V]
"""

from llama3.config import ModelConfig, PRESETS, RopeScaling, get_preset
from llama3.errors import Llama3Error
from llama3.llm import LLM, load
from llama3.model import KVCache, Transformer

__all__ = ["LLM", "load", "load_tokenizer", "ModelConfig", "RopeScaling", "PRESETS", "get_preset",
           "Transformer", "KVCache", "Llama3Error"]


def load_tokenizer(source=None):
    """The tokenizer of `source` (None: Meta's Llama 3 tokenizer). See llama3.tokenizer."""
    from llama3.tokenizer import load_tokenizer as _load

    return _load(source)
