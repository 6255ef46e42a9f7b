"""Perplexity cross-check with llama.cpp, and what 16-bit, int8 and int4 weights cost.

    python benchmarks/perplexity_check.py FILE [--context 512] [--stride 256] [--max-tokens 4096]

The text is tokenized once (our tokenizer) and the same ids, in the same sliding
windows (`llama3.perplexity.plan_windows`), are scored by
    ours:      fp32, bf16, int8 (per-row, from llama.cpp's Q8_0 file), int4 (the Q4_1 file's own blocks)
    llama.cpp: F32, F16, Q8_0, Q4_1 (llama-cpp-python with logits_all=True)
so ours-fp32 vs llama.cpp-F32 checks the computation (same weights, same windows),
and each precision's row shows what it costs against fp32.  The GGUF files come from
benchmarks/speed.py's work folder (run that first, or pass --work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

import numpy as np
import torch


def llamacpp_logits_fn(path: Path, context: int, threads: int):
    """llama.cpp as `tokens [T] -> logits [T, V]` (a fresh context per window)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(tokens.tolist())
        return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))  # [T, V]

    return logits_fn


def main() -> int:
    import llama3
    from llama3.fast import load_fast
    from llama3.perplexity import model_logits_fn, perplexity_of_ids

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--model", default=None)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/llama3-bench", help="benchmarks/speed.py's folder of GGUF files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    base = llama3.load(args.model)
    ids = base.tokenizer.encode(Path(args.file).read_text(encoding="utf-8"))[:args.max_tokens]
    print(f"{args.file}: {len(ids)} tokens, context {args.context}, stride {args.stride}")

    def report(name, logits_fn):
        result = perplexity_of_ids(logits_fn, ids, args.context, args.stride)
        print(f"{name:16s} perplexity {result.perplexity:9.4f}   nll {result.nll:.5f}", flush=True)
        return result.perplexity

    ours = {"ours-fp32": report("ours-fp32", model_logits_fn(base.model))}
    del base
    ours["ours-bf16"] = report("ours-bf16", model_logits_fn(load_fast(args.model, dtype="bfloat16").model))
    q8 = work / "model-q8_0.gguf"
    int8 = load_fast(str(q8) if q8.exists() else args.model, quantize="int8")
    ours["ours-int8"] = report("ours-int8" + ("(q8_0)" if q8.exists() else ""), model_logits_fn(int8.model))
    q4 = work / "model-q4_1.gguf"
    int4 = load_fast(str(q4) if q4.exists() else args.model, quantize="int4")
    ours["ours-int4"] = report("ours-int4" + ("(q4_1)" if q4.exists() else ""), model_logits_fn(int4.model))
    del int8, int4
    peers = {}
    try:
        for kind in ("f32", "f16", "q8_0", "q4_1"):
            if (work / f"model-{kind}.gguf").exists():
                peers[kind] = report(f"llama.cpp-{kind}", llamacpp_logits_fn(work / f"model-{kind}.gguf",
                                                                             args.context, args.threads))
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e .[bench]); no cross-check")
    for ours_name, peer in (("ours-fp32", "f32"), ("ours-bf16", "f16"), ("ours-int8", "q8_0"), ("ours-int4", "q4_1")):
        if peer in peers:
            print(f"{ours_name} / llama.cpp-{peer}: {ours[ours_name] / peers[peer]:.4f}")
    print("cost vs fp32: " + ", ".join(f"{name[5:]} {ours[name] / ours['ours-fp32'] - 1:+.2%}"
                                       for name in ("ours-bf16", "ours-int8", "ours-int4")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
