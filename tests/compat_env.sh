#!/usr/bin/env bash
# Build the environment that tests/test_versions.py runs the compatibility subset in: the newest torch that pip
# installs here (2.14.1: pip's cap on this project's machines, a CUDA build on local disk that runs on the CPU) and this
# package with its own ranges, which resolve to the newest transformers, accelerate, peft and datasets on the index
# (tests/test_packaging.py checks). GVM_COMPAT_TORCH picks another torch, e.g. torch==2.15.0 with pip's cap lifted
# (PIP_CONFIG_FILE=/dev/null). Usage: bash tests/compat_env.sh [VENV_DIR]   (default .venv-compat)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-compat}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "${GVM_COMPAT_TORCH:-torch==2.14.1}" -e . pytest "hypothesis>=6.100"
"$VENV/bin/python" -c "import torch, transformers, accelerate, peft, trl, gvm_trl
print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
      'peft', peft.__version__, 'trl', trl.__version__)"
echo "export GVM_COMPAT_PYTHON=$(cd "$VENV" && pwd)/bin/python"
