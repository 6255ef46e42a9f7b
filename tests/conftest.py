"""Shared fixtures. Tiny random models are made here; the one real model (the embedded
SmolLM2-135M-Instruct GGUF) is loaded at most once per test session."""

import pytest
import torch

from llama3.config import ModelConfig, RopeScaling
from llama3.model import Transformer


def make_config(**overrides) -> ModelConfig:
    """A tiny grouped-query config; override any field."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96,
                max_seq_len=128, rope_theta=500000.0)
    base.update(overrides)
    return ModelConfig(**base)


def make_model(config: ModelConfig | None = None, seed: int = 0) -> Transformer:
    """A tiny model with random weights (norm weights random too, so they matter)."""
    torch.manual_seed(seed)
    model = Transformer(config or make_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 1.0).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


@pytest.fixture
def tiny_config() -> ModelConfig:
    return make_config()


@pytest.fixture
def tiny_model(tiny_config) -> Transformer:
    return make_model(tiny_config)


@pytest.fixture
def scaled_config() -> ModelConfig:
    return make_config(rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=16))


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model, loaded once (fp32)."""
    import llama3

    return llama3.load()


@pytest.fixture(params=[False, True], ids=["simd", "plain-c++"])
def ops(request):
    """The C++ kernels' operator namespace, AVX-512 and plain-C++ builds (skipped where they cannot build)."""
    from llama3.fast import kernels

    built = kernels.library(plain=request.param)
    if built is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error(request.param)}")
    return built


@pytest.fixture(scope="session")
def transformers_gguf():
    """transformers' own GGUF loader and tokenizer on the embedded default model's file: the
    independent reference of the parity tests (test_eval, test_generate, test_gguf, test_logprobs),
    loaded once per session (~15 s each time).  Read-only: a test that needs other generation
    settings passes its own GenerationConfig; one that hands the tokenizer to code that may change
    it (lm-eval sets a pad token) hands over a copy.

    While it loads, the gguf package's reader of the file and its tensor-name table are made once:
    transformers parses the file three times (tokenizer, config, weights: ~4 s each here) and builds
    the same name table once per module (~400 times); both are only read, so what it loads is the same.
    The tokenizer is tokenizer_refs' (the tokenizer tests' reference, loaded once for both)."""
    import functools
    from pathlib import Path

    import accelerate  # noqa: F401  (transformers needs it for gguf_file=)
    import gguf
    import transformers  # the reference: a dev dependency, never skipped

    from llama3.llm import _smollm2_path
    from tokenizer_refs import transformers_gguf_tokenizer

    path = Path(_smollm2_path())
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(name_map)
    try:
        tokenizer = transformers_gguf_tokenizer(str(path))  # AutoTokenizer(gguf_file=), shared with its callers
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    return model, tokenizer
