#!/usr/bin/env bash
# The CUDA check in one command, from the repository root of a machine with an NVIDIA GPU:
#
#     bash scripts/device_check.sh            # logs, JSON and the table into $OUT (default /tmp/out)
#
# 1. what the machine is: nvidia-smi -L, python, torch (its CUDA), transformers
# 2. tests/test_device.py on cuda (parity with transformers, attention kernels, KV-cache decoding,
#    fast paths, the engine's CUDA graphs and device sampling, training, torch.compile); no -x, so
#    one failure does not hide the others
# 3. benchmarks/cuda_speed.py --batches: decode per batch size (1, 8, 32), ours (the engine with
#    its plan: CUDA graphs per bucket, sampling on the device) vs transformers' generate(), eager
# 4. the same prompts through transformers' static cache + torch.compile (reduce-overhead), ours not
#    rerun; allowed to fail or time out (compiling takes a minute or more a batch size)
# 5. one markdown table of 3 and 4 (ratios ours / transformers, ours / compiled): $OUT/batches.md
#
# The package need not be installed: PYTHONPATH=. makes this checkout's llama3 importable.
# Exit status: non-zero when step 1, 2 or 3 failed (step 4 never fails the script).
# Time: every step has a timeout; step 4 gets what is left of BUDGET seconds (default 480), at most
# 240, so the whole script ends within ~8 minutes.  A dry run of steps 3-5 on a CPU (tiny model):
#     DRY_RUN=1 bash scripts/device_check.sh
# Settings: CONFIGS (default smollm2-135m; also llama-3.2-1b), BATCHES (1,8,32), NEW (128), PROMPT (16).

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LLAMA3_TEST_DEVICE=${LLAMA3_TEST_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-480}
CONFIGS=${CONFIGS:-smollm2-135m}
BATCHES=${BATCHES:-1,8,32}
NEW=${NEW:-128}
PROMPT=${PROMPT:-16}
DRY_RUN=${DRY_RUN:-}
status=0
started=$SECONDS

step() { echo; echo "=== $* ($((SECONDS - started)) s since start)"; }

if [ -n "$DRY_RUN" ]; then  # the CPU: a tiny model, a few tokens, float32; no tests (they need the GPU)
    BENCH=(benchmarks/cuda_speed.py --device cpu --tiny --dtype float32 --batches "$BATCHES")
else
    BENCH=(benchmarks/cuda_speed.py --configs "$CONFIGS" --batches "$BATCHES" --new "$NEW" --prompt "$PROMPT")
fi

step "machine"
{
    nvidia-smi -L || echo "nvidia-smi failed"
    "$PYTHON" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import llama3.model, llama3.generate, llama3.fast, llama3.fast.cuda_decode, llama3.engine, llama3.train.trainer
print("llama3 imports from", llama3.model.__file__)'
    uptime
} 2>&1 | tee "$OUT/machine.log" || status=1

if [ -z "$DRY_RUN" ]; then
    step "tests/test_device.py on $LLAMA3_TEST_DEVICE"
    timeout 200 "$PYTHON" -m pytest -v -rfEs -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/test_device.log" || status=1
fi

step "decode per batch size ($BATCHES): ours vs transformers"
timeout 150 "$PYTHON" "${BENCH[@]}" --peers transformers --out "$OUT/batches.json" 2>&1 | tee "$OUT/batches.log" || status=1

left=$((BUDGET - (SECONDS - started) - 10))
left=$((left > 240 ? 240 : left))
step "the same against transformers compiled (static cache, torch.compile; allowed to fail; ${left} s)"
if [ "$left" -ge 60 ]; then
    timeout "$left" "$PYTHON" "${BENCH[@]}" --variants none --peers transformers-compiled \
        --out "$OUT/batches_compiled.json" 2>&1 | tee "$OUT/batches_compiled.log" \
        || echo "(the compiled transformers run failed or timed out after ${left} s; its rows so far are kept)"
else
    echo "skipped: only ${left} s of the ${BUDGET} s budget left"
fi

step "table"
timeout 30 "$PYTHON" benchmarks/cuda_speed.py --merge "$OUT/batches.json" "$OUT/batches_compiled.json" 2>&1 \
    | tee "$OUT/batches.md" || status=1
uptime

step "done: status $status; logs in $OUT"
ls -l "$OUT"
exit $status
