"""One client alone: the engine's step (the readable forward over the paged cache) against the
one-batch generator's C decoding step, on the same int4 model, alternately in one process.

    python benchmarks/engine_lone_client.py [--rounds 3] [--new 64]

What a lone request costs now that every caller goes through the engine (the C step reads a
contiguous KVCache and is not used by the engine; see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from llama3.engine import Engine, EngineConfig
from llama3.fast import load_fast
from llama3.generate import GenerationSettings, generate_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = load_fast(None, quantize="int4")
    ids = llm.tokenizer.encode("Write a long story about a lighthouse keeper. Chapter 1:")
    settings = GenerationSettings(max_new_tokens=args.new)
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(kv_memory="1GB"))
    engine.run([ids], GenerationSettings(max_new_tokens=4))                      # warm-up both
    list(generate_tokens(llm.model, [ids], GenerationSettings(max_new_tokens=4)))
    for r in range(args.rounds):
        run = generate_tokens(llm.model, [ids], settings, llm.tokenizer.stop_ids)
        start = time.perf_counter()
        list(run)
        c_step = len(run.tokens[0]) / (time.perf_counter() - start)
        start = time.perf_counter()
        result = engine.run([ids], settings)[0]
        ours = len(result.token_ids) / (time.perf_counter() - start)
        print(f"round {r}: TokenGeneration (C step) {c_step:.1f} tok/s, engine {ours:.1f} tok/s, "
              f"ratio {ours / c_step:.2f}", flush=True)


if __name__ == "__main__":
    main()
