"""Perplexity cross-check with llama.cpp, and what 16-bit, int8 and int4 weights cost.

    python benchmarks/perplexity_check.py FILE [--context 512] [--stride 256] [--max-tokens 4096]
                                               [--configs bf16,int8,int4] [--greedy-tokens 32] [--decode]

The text is tokenized once (our tokenizer) and the same ids, in the same sliding
windows (`llama3.perplexity.plan_windows`), are scored by
    ours:      fp32, bf16, int8 (32-weight groups: llama.cpp's Q8_0 file as it is, else the model's
               own weights re-quantized), int4 (the Q4_1 file's own blocks)
    llama.cpp: F32, F16, Q8_0, Q4_1 (llama-cpp-python with logits_all=True)
so ours-fp32 vs llama.cpp-F32 checks the computation (same weights, same windows),
and each precision's row shows what it costs against fp32.  The GGUF files come from
benchmarks/speed.py's work folder (run that first, or pass --work); without them every row reads
--model (default: the embedded Q4_1 model).

Greedy matches: each precision continues the same 16 prompts greedily (--greedy-tokens new tokens,
one prompt at a time) and counts the prompts whose continuation equals fp32's token for token
(fp32 itself is run twice, through the decoding path and through the plain model, for the floor).

--decode: a window's scored positions past its context (the last `stride`) are computed by
one-token steps over the KV cache, as decoding computes them (for int8 the C++ matvec, which takes
x as int16 groups), instead of by the window's one prompt pass (a GEMM over bf16-widened weights):
the perplexity of what decoding runs.  The first window's first context - stride - 1 rows stay a
prompt (~3% of 4096 tokens).  About 4096 one-token steps a precision.
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


PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
    "The three primary colors are", "Water boils at", "The best way to learn a language is",
    "In 1969, astronauts", "A recipe for pancakes: first,", "The theory of relativity says",
    "import numpy as np\n", "My favourite book is", "The largest planet in the solar system",
    "Photosynthesis is the process", "To be or not to be,", "The stock market today", "Dear hiring manager,",
]


def greedy_continuations(llm, new_tokens: int) -> list[str]:
    return [llm.generate(prompt, max_new_tokens=new_tokens) for prompt in PROMPTS]


def decode_logits_fn(model: torch.nn.Module, prompt_rows: int):
    """`tokens [T] -> logits [T, V]` as decoding computes them: the first `prompt_rows` positions as
    one prompt, every later one a one-token step over the KV cache (with --decode: the rows a
    window scores past its context then go through the matvec kernels decoding runs, not the
    prompt's GEMM)."""
    from llama3.model import KVCache

    device = model.device

    @torch.inference_mode()
    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device).unsqueeze(0)
        cache = KVCache(model.config, 1, tokens.shape[1], dtype=model.dtype, device=device)
        split = max(1, min(prompt_rows, tokens.shape[1]))
        rows = [model(tokens[:, :split], 0, cache)[0]]
        rows += [model(tokens[:, t:t + 1], t, cache)[0] for t in range(split, tokens.shape[1])]
        return torch.cat(rows).float().cpu()

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
    parser.add_argument("--configs", default="bf16,int8,int4", help="precisions besides fp32 (default all)")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="greedy continuation length (0: skip)")
    parser.add_argument("--decode", action="store_true",
                        help="score each window's last `stride` positions by one-token decoding steps over "
                             "the KV cache (the decoding kernels; the first window's context rows stay a prompt)")
    args = parser.parse_args()
    configs = args.configs.split(",")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    base = llama3.load(args.model)
    ids = base.tokenizer.encode(Path(args.file).read_text(encoding="utf-8"))[:args.max_tokens]
    print(f"{args.file}: {len(ids)} tokens, context {args.context}, stride {args.stride}"
          + (" (scored rows by decoding steps)" if args.decode else ""))

    scorer = (lambda model: decode_logits_fn(model, args.context - args.stride - 1)) if args.decode else model_logits_fn

    def report(name, logits_fn):
        result = perplexity_of_ids(logits_fn, ids, args.context, args.stride)
        print(f"{name:16s} perplexity {result.perplexity:9.4f}   nll {result.nll:.5f}", flush=True)
        return result.perplexity

    ours = {"ours-fp32": report("ours-fp32", scorer(base.model))}
    greedy = {}

    def check_greedy(name, llm):
        if args.greedy_tokens:
            texts = greedy_continuations(llm, args.greedy_tokens)
            if "fp32" not in greedy:
                greedy["fp32"] = texts
            same = sum(a == b for a, b in zip(texts, greedy["fp32"]))
            print(f"{name:16s} greedy {same} of {len(PROMPTS)} prompts equal fp32's {args.greedy_tokens} tokens",
                  flush=True)

    check_greedy("ours-fp32", base)
    check_greedy("ours-fp32-plain", llama3.load(args.model, plain=True))
    del base
    if "bf16" in configs:
        bf16 = load_fast(args.model, dtype="bfloat16")
        ours["ours-bf16"] = report("ours-bf16", scorer(bf16.model))
        check_greedy("ours-bf16", bf16)
        del bf16
    for quantize, blocks in (("int8", "q8_0"), ("int4", "q4_1")):  # from llama.cpp's file where there is one
        if quantize not in configs:
            continue
        source = work / f"model-{blocks}.gguf"
        quantized = load_fast(str(source) if source.exists() else args.model, quantize=quantize)
        name = f"ours-{quantize}"
        ours[name] = report(name + (f"({blocks})" if source.exists() else ""), scorer(quantized.model))
        check_greedy(name, quantized)
        del quantized
    peers = {}
    try:
        for kind in ("f32", "f16", "q8_0", "q4_1"):
            if (work / f"model-{kind}.gguf").exists():
                peers[kind] = report(f"llama.cpp-{kind}", llamacpp_logits_fn(work / f"model-{kind}.gguf",
                                                                             args.context, args.threads))
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e .[bench]); no cross-check")
    for ours_name, peer in (("ours-fp32", "f32"), ("ours-bf16", "f16"), ("ours-int8", "q8_0"), ("ours-int4", "q4_1")):
        if peer in peers and ours_name in ours:
            print(f"{ours_name} / llama.cpp-{peer}: {ours[ours_name] / peers[peer]:.4f}")
    print("cost vs fp32: " + ", ".join(f"{name[5:]} {ours[name] / ours['ours-fp32'] - 1:+.2%}"
                                       for name in ("ours-bf16", "ours-int8", "ours-int4") if name in ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
