#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup.sh), converts SmolLM2-135M-Instruct from its offline package once
# (cached under ${VRPO_CACHE:-~/.cache/vrpo_pl}), then trains configs/quickstart.yaml. Extra arguments go to
# `vrpo fit` (e.g. --trainer.max_steps 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "from vrpo_pl.hub import smollm2_path; print('model:', smollm2_path())"
start=$(date +%s)
.venv/bin/vrpo fit --config configs/quickstart.yaml "$@"
echo "quickstart: training took $(( $(date +%s) - start )) s; open TensorBoard with: .venv/bin/tensorboard --logdir runs"
