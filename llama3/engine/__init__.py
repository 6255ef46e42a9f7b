"""The serving engine: continuous batching over a paged KV cache with a prefix cache.

    engine = Engine(model, tokenizer, EngineConfig(kv_memory="2GB", parallel=8))
    for event in engine.stream([prompt_ids], GenerationSettings(max_new_tokens=64)):
        ...                                   # ("text", row, piece), ("end", row, reason, n, cached)

Modules: `blocks` (which block is free, held or cached), `paged_cache` (the tensors and
the cache object the model's forward writes and reads), `sequence` (one prompt's state and
the request handle), `scheduler` (the step loop), `memory` (the budget).
"""

from llama3.engine.scheduler import Engine, EngineConfig, QueueFull
from llama3.engine.sequence import Cancelled, Request, Result

__all__ = ["Cancelled", "Engine", "EngineConfig", "QueueFull", "Request", "Result"]
