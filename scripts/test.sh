#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenMP threads that spin while waiting make torch collapse when another process shares the cores (the suite
# runs 2-process DDP/FSDP2 tests; measured: a 16x48 sampling batch 187 s spinning vs 26 s passive under load).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest -q "$@"
