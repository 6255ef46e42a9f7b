#!/usr/bin/env bash
# The CUDA check in one command, from the repository root of a machine with an NVIDIA GPU:
#
#     bash scripts/device_check.sh            # logs and JSON into $OUT (default /tmp/out)
#
# 1. what the machine is: nvidia-smi -L, python, torch (its CUDA), transformers
# 2. tests/test_device.py on cuda (parity with transformers, attention kernels, KV-cache decoding,
#    fast paths, training, torch.compile); no -x, so one failure does not hide the others
# 3. benchmarks/cuda_speed.py: ours vs transformers, SmolLM2-135M and Llama-3.2-1B shapes, bf16
# 4. the same with --compile (fused + torch.compile reduce-overhead), allowed to fail or time out
#
# The package need not be installed: PYTHONPATH=. makes this checkout's llama3 importable.
# Exit status: non-zero when step 1, 2 or 3 failed (step 4 never fails the script).
# Time: each step has a timeout, and step 4 gets what is left of BUDGET seconds (default 480),
# so the whole script ends within ~8 minutes.  Expected on an H100: ~1-2 min tests, ~1-2 min
# benchmark, the rest (at most 3 min) for the compiled benchmark.

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LLAMA3_TEST_DEVICE=${LLAMA3_TEST_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-480}
status=0
started=$SECONDS

step() { echo; echo "=== $* ($((SECONDS - started)) s since start)"; }

step "machine"
{
    nvidia-smi -L || echo "nvidia-smi failed"
    "$PYTHON" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import llama3.model, llama3.generate, llama3.fast, llama3.fast.fuse, llama3.fast.quantize, llama3.train.trainer
print("llama3 imports from", llama3.model.__file__)'
} 2>&1 | tee "$OUT/machine.log" || status=1

step "tests/test_device.py on $LLAMA3_TEST_DEVICE"
timeout 210 "$PYTHON" -m pytest -v -rfEs -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/test_device.log" || status=1

step "benchmarks/cuda_speed.py"
timeout 150 "$PYTHON" benchmarks/cuda_speed.py --out "$OUT/cuda_speed.json" 2>&1 | tee "$OUT/cuda_speed.log" || status=1

left=$((BUDGET - (SECONDS - started) - 10))
left=$((left > 180 ? 180 : left))
step "benchmarks/cuda_speed.py --compile, smollm2-135m (allowed to fail; ${left} s)"
if [ "$left" -ge 60 ]; then
    timeout "$left" "$PYTHON" benchmarks/cuda_speed.py --compile --configs smollm2-135m \
        --out "$OUT/cuda_speed_compile.json" 2>&1 | tee "$OUT/cuda_speed_compile.log" \
        || echo "(the --compile benchmark failed or timed out after ${left} s; not counted)"
else
    echo "skipped: only ${left} s of the ${BUDGET} s budget left"
fi

step "done: status $status; logs in $OUT"
ls -l "$OUT"
exit $status
